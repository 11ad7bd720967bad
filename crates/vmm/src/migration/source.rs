//! The source side: QEMU's pre-copy loop.
//!
//! setup → active (a bulk pass over all RAM, zero pages as a flag, then
//! passes over dirty pages) → device (vCPUs paused, last dirty pages, vCPU
//! and device state, end of stream) → completed once the destination
//! confirms. Any failure or cancel before that resumes the guest.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::GuestMemory;
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::multifd::{Channels, Connection};
use super::params::{Capabilities, MigrationInfo, MigrationStatus, Parameters, ParamsError};
use super::sender::{PageSender, Progress, Work, Xbzrle};
use super::stream::{encode_blob, SectionKind, Setup, StreamError, StreamWriter};
use super::transport::{Interrupt, MigrationUri, Outgoing, TransportError};
use super::PAGE_SIZE;

/// An error the VMM reports through [`MigratableVm`].
pub type VmOpError = Box<dyn std::error::Error + Send + Sync>;

/// Dirty pages per memory region: (guest address of the region, one bit
/// per 4 KiB page, least significant bit first), as `GuestRam::take_dirty_pages`.
pub type DirtyBitmap = Vec<(u64, Vec<u64>)>;

/// Saved vCPU and device state, taken while the vCPUs are paused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// One blob per vCPU, in vCPU order.
    pub vcpus: Vec<Vec<u8>>,
    /// (name, blob) per device, including VM-wide state (clock, irqchip).
    pub devices: Vec<(String, Vec<u8>)>,
}

/// What the engine needs from the VMM.
pub trait MigratableVm {
    /// Guest RAM; the engine only reads it.
    fn memory(&self) -> &GuestMemory;
    /// Starts or stops dirty tracking (KVM's log on every slot).
    fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmOpError>;
    /// Pages written since the last call (KVM's log ORed with the
    /// GuestMemory bitmap); both logs are reset.
    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, VmOpError>;
    /// Stops the vCPUs; returns once none runs.
    fn pause(&mut self);
    fn resume(&mut self);
    /// vCPU and device state (disks flushed), called while paused.
    fn save_state(&mut self) -> Result<SavedState, VmOpError>;
}

/// Errors of an outgoing migration.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("migration: {what}: {source}")]
    Vm {
        what: &'static str,
        source: VmOpError,
    },
    #[error("migration: reading guest page {addr:#x}: {problem}")]
    Memory { addr: u64, problem: String },
    #[error("migration cancelled")]
    Cancelled,
    #[error("migration: the destination failed: {0}")]
    Rejected(String),
    #[error("migration: return path: {0}")]
    ReturnPath(String),
    #[error("migration: multifd channel {channel} failed: {problem}")]
    Multifd { channel: usize, problem: String },
}

fn vm_err(what: &'static str) -> impl FnOnce(VmOpError) -> SourceError {
    move |source| SourceError::Vm { what, source }
}

/// Shared between the migration thread and the VMM: `query-migrate`,
/// `migrate_cancel` and the throttle the vCPU threads obey.
#[derive(Default)]
pub struct MigrationControl {
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    throttle: AtomicU8,
    interrupts: Mutex<Vec<Interrupt>>,
}

/// One slice of vCPU run time for auto-converge (QEMU's 10 ms).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

impl MigrationControl {
    /// The current `query-migrate` answer.
    pub fn info(&self) -> MigrationInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks a migration as starting, before its thread runs, so that a
    /// `query-migrate` right after `migrate` never shows the previous one.
    pub fn begin(&self) {
        self.update(|i| {
            *i = MigrationInfo::default();
            i.status = MigrationStatus::Setup;
        });
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// `migrate_cancel`: the engine stops at its next step; blocked socket
    /// writes are broken.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        for i in self
            .interrupts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            i.interrupt();
        }
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn add_interrupt(&self, interrupt: Option<Interrupt>) {
        if let Some(i) = interrupt {
            if self.cancelled() {
                i.interrupt();
            }
            self.interrupts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(i);
        }
    }

    /// Auto-converge's throttle in percent (0: none).
    pub fn throttle_percentage(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// How long a vCPU thread sleeps after each [`THROTTLE_SLICE`] it ran,
    /// so that it runs (100 - throttle)% of the time (QEMU's formula).
    pub fn throttle_sleep(&self) -> Duration {
        let pct = f64::from(self.throttle_percentage().min(99));
        THROTTLE_SLICE.mul_f64(pct / (100.0 - pct))
    }
}

/// Where MIGRATION and MIGRATION_PASS events go (name, data).
pub type Events<'a> = &'a (dyn Fn(&str, Value) + Sync);

/// QEMU's auto-converge trigger: dirtying more than half of what was sent
/// in a period, twice, raises the throttle.
#[derive(Debug, Default)]
pub struct AutoConverge {
    high: u32,
}

impl AutoConverge {
    /// The new throttle after a sync, if it changes.
    pub fn after_sync(
        &mut self,
        dirty_bytes: u64,
        sent_bytes: u64,
        current: u8,
        params: &Parameters,
    ) -> Option<u8> {
        if dirty_bytes <= sent_bytes / 2 {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        Some(if current == 0 {
            params.cpu_throttle_initial.min(params.max_cpu_throttle)
        } else {
            current
                .saturating_add(params.cpu_throttle_increment)
                .min(params.max_cpu_throttle)
        })
    }
}

/// One pass over the pages: when it started and the bytes sent before it.
struct Pass {
    started: Instant,
    bytes_before: u64,
}

/// What a pass sent and how long it took.
struct PassSent {
    bytes: u64,
    time: Duration,
}

impl Pass {
    fn start(transferred: u64) -> Self {
        Pass {
            started: Instant::now(),
            bytes_before: transferred,
        }
    }

    fn end(&self, transferred: u64) -> PassSent {
        PassSent {
            bytes: transferred - self.bytes_before,
            time: self.started.elapsed(),
        }
    }
}

/// What to do after a dirty sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Stop the guest and send the rest.
    Switch,
    /// The rest fits downtime-limit, but another pass shrinks it a lot.
    Shrink,
    /// The rest does not fit downtime-limit yet.
    TooMuch,
}

/// When to stop the guest. QEMU switches over as soon as the rest fits
/// downtime-limit; we do too, unless one more pass is predicted to leave
/// at most half as much (the pages dirtied while sending the rest), in
/// which case the pass costs little more than the downtime it saves and
/// the guest stops for less.
#[derive(Debug, Default)]
struct Switchover {
    shrink_passes: u32,
}

/// Below this expected downtime another pass is not worth a sync.
const DOWNTIME_FLOOR_MS: f64 = 1.0;
/// At most this many passes beyond the first that fits.
const MAX_SHRINK_PASSES: u32 = 4;

impl Switchover {
    /// `expected_ms`: the rest at the measured bandwidth; `dirtied_next`:
    /// pages the guest is predicted to dirty while one more pass sends it.
    fn decide(
        &mut self,
        expected_ms: f64,
        limit_ms: f64,
        dirty_pages: u64,
        dirtied_next: f64,
    ) -> Decision {
        if expected_ms > limit_ms {
            return Decision::TooMuch;
        }
        let worth = expected_ms > DOWNTIME_FLOOR_MS
            && dirtied_next * 2.0 <= dirty_pages as f64
            && self.shrink_passes < MAX_SHRINK_PASSES;
        if worth {
            self.shrink_passes += 1;
            Decision::Shrink
        } else {
            Decision::Switch
        }
    }
}

/// The RAM page senders: the main thread's on the one connection, or the
/// multifd channel threads.
enum Pages<'scope> {
    Main,
    Multifd(Channels<'scope>),
}

struct Engine<'a, 'scope> {
    vm: &'a mut dyn MigratableVm,
    /// The same RAM as `vm.memory()`, for the senders while `vm` syncs.
    memory: GuestMemory,
    caps: Capabilities,
    params: Parameters,
    control: &'a MigrationControl,
    events: Events<'a>,
    progress: &'a Progress<'a>,
    main: PageSender<Box<dyn Write + Send>>,
    pages: Pages<'scope>,
}

fn count_pages(bitmap: &DirtyBitmap) -> u64 {
    bitmap
        .iter()
        .flat_map(|(_, w)| w.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn merge(into: &mut DirtyBitmap, other: DirtyBitmap) {
    for ((base, words), (obase, owords)) in into.iter_mut().zip(other) {
        debug_assert_eq!(*base, obase);
        for (w, o) in words.iter_mut().zip(owords) {
            *w |= o;
        }
    }
}

impl Engine<'_, '_> {
    fn set_status(&self, status: MigrationStatus) {
        self.control.update(|i| i.status = status);
        if self.caps.events {
            (self.events)("MIGRATION", json!({"status": status.name()}));
        }
    }

    /// Sends one pass on the main connection or the multifd channels.
    fn pass(&mut self, pages: u64, work: Work) -> Result<(), SourceError> {
        self.progress.start_pass(pages);
        match &mut self.pages {
            Pages::Main => {
                let sync = self.progress.ram().dirty_sync_count;
                self.main.run(&self.memory, &work, self.progress, sync)
            }
            Pages::Multifd(channels) => channels.pass(work),
        }
    }

    /// The first pass: every page.
    fn send_bulk(&mut self) -> Result<(), SourceError> {
        let regions: Vec<(u64, u64)> = (self.memory.iter())
            .map(|r| (r.start_addr().0, r.len() / PAGE_SIZE as u64))
            .collect();
        let pages = regions.iter().map(|(_, pages)| pages).sum();
        self.pass(pages, Work::Bulk(Arc::new(regions)))
    }

    /// Sends every page set in `bitmap`.
    fn send_dirty(&mut self, bitmap: DirtyBitmap) -> Result<(), SourceError> {
        self.pass(count_pages(&bitmap), Work::Dirty(Arc::new(bitmap)))
    }

    /// Bytes per second the link takes: the better of the last pass's
    /// rate and the last 100 ms window's (both include time spent on pages
    /// that cost no bytes, so both are lower bounds), else the average.
    fn bandwidth(&self, pass: &PassSent, active_since: Instant) -> f64 {
        let pass_rate = pass.bytes as f64 / pass.time.as_secs_f64().max(1e-4);
        let rate = pass_rate.max(self.progress.rate().unwrap_or(0.0));
        if rate > 0.0 {
            rate
        } else {
            let transferred = self.progress.ram().transferred;
            (transferred as f64 / active_since.elapsed().as_secs_f64().max(1e-3)).max(1.0)
        }
    }

    /// The pre-copy loop; returns the dirty pages not sent yet.
    fn iterate(&mut self) -> Result<DirtyBitmap, SourceError> {
        let active_since = Instant::now();
        let mut last_sync = active_since;
        let mut pass = Pass::start(self.progress.ram().transferred);
        self.send_bulk()?;
        let mut auto = AutoConverge::default();
        let mut switchover = Switchover::default();
        loop {
            let sent = pass.end(self.progress.ram().transferred);
            let dirty = self
                .vm
                .take_dirty_pages()
                .map_err(vm_err("syncing the dirty bitmap"))?;
            let dirty_pages = count_pages(&dirty);
            let period = last_sync.elapsed().as_secs_f64().max(1e-3);
            last_sync = Instant::now();
            let bandwidth = self.bandwidth(&sent, active_since);
            let remaining = dirty_pages * PAGE_SIZE as u64;
            let expected_ms = remaining as f64 / bandwidth * 1000.0;
            let dirty_pages_rate = (dirty_pages as f64 / period) as u64;
            self.control
                .update(|i| i.expected_downtime = Some(expected_ms as u64));
            self.progress.start_pass(dirty_pages);
            self.progress.update(|ram| {
                ram.dirty_sync_count += 1;
                ram.dirty_pages_rate = dirty_pages_rate;
                ram.mbps = bandwidth * 8.0 / 1e6;
            });
            let sync_count = self.progress.ram().dirty_sync_count;
            if self.caps.events {
                (self.events)("MIGRATION_PASS", json!({"pass": sync_count}));
            }
            let decision = switchover.decide(
                expected_ms,
                self.params.downtime_limit as f64,
                dirty_pages,
                dirty_pages_rate as f64 * expected_ms / 1000.0,
            );
            tracing::debug!(
                pass = sync_count,
                dirty_pages,
                pass_bytes = sent.bytes,
                pass_ms = sent.time.as_secs_f64() * 1000.0,
                bandwidth_mib_s = bandwidth / f64::from(1 << 20),
                expected_ms,
                ?decision,
                "migration sync"
            );
            if decision == Decision::Switch {
                return Ok(dirty);
            }
            if self.caps.auto_converge && decision == Decision::TooMuch {
                let current = self.control.throttle_percentage();
                if let Some(t) = auto.after_sync(remaining, sent.bytes, current, &self.params) {
                    tracing::info!(throttle = t, "migration auto-converge throttle");
                    self.control.throttle.store(t, Ordering::Relaxed);
                }
            }
            pass = Pass::start(self.progress.ram().transferred);
            self.send_dirty(dirty)?;
        }
    }

    /// Paused: the last pages, the state, the end of stream.
    fn complete(&mut self, mut rest: DirtyBitmap) -> Result<(), SourceError> {
        let t0 = Instant::now();
        let last = self
            .vm
            .take_dirty_pages()
            .map_err(vm_err("syncing the dirty bitmap"))?;
        merge(&mut rest, last);
        self.progress.update(|ram| ram.dirty_sync_count += 1);
        let t_sync = t0.elapsed();
        let final_pages = count_pages(&rest);
        self.progress.unlimit();
        self.send_dirty(rest)?;
        if let Pages::Multifd(channels) = std::mem::replace(&mut self.pages, Pages::Main) {
            channels.finish()?;
        }
        let t_send = t0.elapsed();
        let state = self
            .vm
            .save_state()
            .map_err(vm_err("saving vCPU and device state"))?;
        let main = self.main.stream();
        for (index, blob) in state.vcpus.iter().enumerate() {
            main.section(SectionKind::Vcpu, &encode_blob(&index.to_string(), blob))?;
        }
        for (name, blob) in &state.devices {
            main.section(SectionKind::Device, &encode_blob(name, blob))?;
        }
        main.section(SectionKind::End, &[])?;
        main.flush()?;
        tracing::debug!(
            final_pages,
            sync_us = t_sync.as_micros() as u64,
            send_us = t_send.as_micros() as u64,
            state_us = t0.elapsed().as_micros() as u64,
            "migration final stage"
        );
        self.progress.start_pass(0);
        self.progress.publish();
        Ok(())
    }

    /// Everything from the first pass to the end of stream; `paused` is
    /// set once the vCPUs are stopped.
    fn run(&mut self, paused: &mut bool) -> Result<Instant, SourceError> {
        self.set_status(MigrationStatus::Active);
        let rest = self.iterate()?;
        self.set_status(MigrationStatus::Device);
        let paused_at = Instant::now();
        self.vm.pause();
        *paused = true;
        tracing::debug!(
            pause_us = paused_at.elapsed().as_micros() as u64,
            "migration vCPUs paused"
        );
        self.complete(rest)?;
        Ok(paused_at)
    }

    /// After a failure: the channel threads give up too.
    fn stop_channels(&mut self) {
        if let Pages::Multifd(channels) = std::mem::replace(&mut self.pages, Pages::Main) {
            channels.stop();
        }
    }
}

/// Reads the destination's verdict: "OK", or "ER" and a message.
fn await_confirmation(mut rp: Box<dyn Read + Send>) -> Result<(), SourceError> {
    let mut head = [0u8; 2];
    rp.read_exact(&mut head).map_err(|e| {
        SourceError::ReturnPath(format!(
            "the destination closed the connection without confirming ({e})"
        ))
    })?;
    match &head {
        b"OK" => Ok(()),
        b"ER" => {
            let mut message = Vec::new();
            let _ = rp.take(4096).read_to_end(&mut message);
            Err(SourceError::Rejected(
                String::from_utf8_lossy(&message).into_owned(),
            ))
        }
        other => Err(SourceError::ReturnPath(format!(
            "unexpected reply {other:02x?}"
        ))),
    }
}

/// Opens the multifd connections, each with its setup section.
fn open_multifd(
    uri: &MigrationUri,
    setup: Setup,
    control: &MigrationControl,
    conns: &mut Vec<Outgoing>,
) -> Result<Vec<Connection>, SourceError> {
    let mut connections = Vec::new();
    for channel in 1..=setup.multifd_channels {
        let conn = Outgoing::connect_extra(uri)?;
        control.add_interrupt(conn.interrupt());
        let writer = conn.writer().map_err(|source| TransportError::Io {
            uri: uri.to_string(),
            what: "multifd connection",
            source,
        })?;
        let interrupt = conn.interrupt();
        conns.push(conn);
        let mut stream = StreamWriter::new(writer)?;
        stream.section(SectionKind::Setup, &Setup { channel, ..setup }.encode())?;
        connections.push(Connection { stream, interrupt });
    }
    Ok(connections)
}

/// Migrates the VM to `uri`. On success the guest stays paused (it runs on
/// the destination now); on any error it runs again here, as before.
pub fn migrate(
    vm: &mut dyn MigratableVm,
    uri: &MigrationUri,
    caps: Capabilities,
    params: Parameters,
    control: &MigrationControl,
    events: Events,
) -> Result<(), SourceError> {
    caps.validate()?;
    params.validate()?;
    let start = Instant::now();
    control.cancel.store(false, Ordering::SeqCst);
    control.throttle.store(0, Ordering::Relaxed);
    control
        .interrupts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    control.update(|i| *i = MigrationInfo::default());
    let mut paused = false;
    let mut extra = Vec::new();
    let mut conn = None;
    let result = run(
        vm,
        uri,
        caps,
        params,
        control,
        events,
        start,
        &mut paused,
        &mut conn,
        &mut extra,
    );
    control.throttle.store(0, Ordering::Relaxed);
    let logging_off = vm.set_dirty_logging(false);
    match result {
        Ok(downtime) => {
            if let Err(e) = logging_off {
                tracing::warn!("migration completed; turning dirty logging off failed: {e}");
            }
            control.update(|i| {
                i.status = MigrationStatus::Completed;
                i.total_time = Some(start.elapsed().as_millis() as u64);
                i.downtime = Some(downtime.as_millis() as u64);
                i.cpu_throttle_percentage = None;
            });
            if caps.events {
                events("MIGRATION", json!({"status": "completed"}));
            }
            Ok(())
        }
        Err(e) => {
            let e = match (&e, &conn) {
                (SourceError::Stream(_) | SourceError::Multifd { .. }, Some(c)) => {
                    c.destination_error().map_or(e, SourceError::Rejected)
                }
                _ => e,
            };
            for c in extra {
                Outgoing::abort(c);
            }
            if let Some(c) = conn {
                c.abort();
            }
            if paused {
                vm.resume();
            }
            let cancelled = control.cancelled();
            let status = if cancelled {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            };
            let e = if cancelled { SourceError::Cancelled } else { e };
            tracing::warn!("migration to {uri} ended: {e}; the guest keeps running here");
            control.update(|i| {
                i.status = status;
                i.total_time = Some(start.elapsed().as_millis() as u64);
                i.error_desc = (!cancelled).then(|| e.to_string());
                i.cpu_throttle_percentage = None;
            });
            if caps.events {
                events("MIGRATION", json!({"status": status.name()}));
            }
            Err(e)
        }
    }
}

/// The migration up to confirmation; returns the downtime.
#[allow(clippy::too_many_arguments)]
fn run(
    vm: &mut dyn MigratableVm,
    uri: &MigrationUri,
    caps: Capabilities,
    params: Parameters,
    control: &MigrationControl,
    events: Events,
    start: Instant,
    paused: &mut bool,
    conn_slot: &mut Option<Outgoing>,
    extra: &mut Vec<Outgoing>,
) -> Result<Duration, SourceError> {
    control.update(|i| i.status = MigrationStatus::Setup);
    if caps.events {
        events("MIGRATION", json!({"status": "setup"}));
    }
    let conn = conn_slot.insert(Outgoing::connect(uri)?);
    control.add_interrupt(conn.interrupt());
    let io = |what| {
        let uri = uri.to_string();
        move |source| TransportError::Io { uri, what, source }
    };
    let writer = conn.writer().map_err(io("opening the stream"))?;
    let return_path = conn.return_path().map_err(io("opening the return path"))?;
    let multifd_channels = if caps.multifd {
        params.multifd_channels
    } else {
        0
    };
    let ram_total: u64 = vm.memory().iter().map(|r| r.len()).sum();
    let setup = Setup {
        channel: 0,
        multifd_channels,
        ram_total,
        page_size: PAGE_SIZE as u32,
    };
    let main = StreamWriter::new(writer)?;
    let mut main = PageSender::new(
        main,
        0,
        1,
        caps.xbzrle.then(|| Xbzrle::new(params.xbzrle_cache_size)),
    );
    main.stream().section(SectionKind::Setup, &setup.encode())?;
    main.stream().flush()?;
    let connections = if caps.multifd {
        open_multifd(uri, setup, control, extra)?
    } else {
        Vec::new()
    };
    vm.set_dirty_logging(true)
        .map_err(vm_err("starting dirty logging"))?;
    // Start from a clean log: the bulk pass sends everything written so far.
    vm.take_dirty_pages()
        .map_err(vm_err("syncing the dirty bitmap"))?;
    let memory = vm.memory().clone();
    let progress = Progress::new(control, ram_total, params.max_bandwidth);
    control.update(|i| i.setup_time = Some(start.elapsed().as_millis() as u64));
    let paused_at = std::thread::scope(|scope| {
        let pages = if caps.multifd {
            Pages::Multifd(Channels::start(scope, connections, &memory, &progress)?)
        } else {
            Pages::Main
        };
        let mut engine = Engine {
            vm,
            memory: memory.clone(),
            caps,
            params,
            control,
            events,
            progress: &progress,
            main,
            pages,
        };
        let result = engine.run(paused);
        if result.is_err() {
            engine.stop_channels();
        }
        result
    })?;
    let sent_at = paused_at.elapsed();
    match return_path {
        Some(rp) => await_confirmation(rp)?,
        None => conn_slot.take().map_or(Ok(()), |c| c.finish(uri))?,
    }
    tracing::debug!(
        sent_us = sent_at.as_micros() as u64,
        confirmed_us = paused_at.elapsed().as_micros() as u64,
        "migration confirmed"
    );
    Ok(paused_at.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_follows_qemus_steps() {
        let params = Parameters {
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 30,
            max_cpu_throttle: 75,
            ..Parameters::default()
        };
        let mut auto = AutoConverge::default();
        // Converging periods never throttle.
        assert_eq!(auto.after_sync(10, 100, 0, &params), None);
        assert_eq!(auto.after_sync(50, 100, 0, &params), None);
        // Two non-converging periods: initial.
        assert_eq!(auto.after_sync(51, 100, 0, &params), None);
        assert_eq!(auto.after_sync(90, 100, 0, &params), Some(20));
        assert_eq!(auto.after_sync(90, 100, 20, &params), None);
        assert_eq!(auto.after_sync(90, 100, 20, &params), Some(50));
        auto.after_sync(90, 100, 50, &params);
        assert_eq!(
            auto.after_sync(90, 100, 50, &params),
            Some(75),
            "capped at max-cpu-throttle"
        );
    }

    #[test]
    fn throttle_sleep_is_the_throttled_share_of_a_slice() {
        let control = MigrationControl::default();
        assert_eq!(control.throttle_sleep(), Duration::ZERO);
        control.throttle.store(50, Ordering::Relaxed);
        assert_eq!(control.throttle_sleep(), Duration::from_millis(10));
        control.throttle.store(99, Ordering::Relaxed);
        assert_eq!(control.throttle_sleep(), Duration::from_millis(990));
    }

    #[test]
    fn bitmaps_count_and_merge() {
        let mut a: DirtyBitmap = vec![(0, vec![0b101, 0]), (1 << 30, vec![1])];
        merge(&mut a, vec![(0, vec![0b010, 1 << 63]), (1 << 30, vec![0])]);
        assert_eq!(a, vec![(0, vec![0b111, 1 << 63]), (1 << 30, vec![1])]);
        assert_eq!(count_pages(&a), 5);
    }
}

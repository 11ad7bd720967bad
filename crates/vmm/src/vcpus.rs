//! The vCPU threads and the control that pauses, resumes and stops them.
//!
//! A vCPU thread holds its `VcpuFd` lock only while in KVM_RUN. To pause,
//! the controller sets the target state and kicks every thread out of
//! KVM_RUN with a signal until all of them have parked; a parked vCPU's fd
//! is free for saving or restoring its state.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{VmRequest, VmRequestSink};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::device_manager::IoBuses;
use crate::migration::source::THROTTLE_SLICE;

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpusError {
    #[error("starting the thread of vCPU {id}: {source}")]
    Spawn { id: u32, source: std::io::Error },
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Exit,
}

struct Shared {
    target: Target,
    /// vCPU threads currently outside KVM_RUN and waiting.
    parked: usize,
}

/// The state every vCPU thread follows.
struct RunControl {
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks while paused; returns false when the thread must end.
    fn wait_runnable(&self) -> bool {
        let mut s = self.lock();
        if s.target == Target::Run {
            return true;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.target == Target::Pause {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        s.target == Target::Run
    }

    /// Parks for good (after a fatal exit) until the VM ends.
    fn park_until_exit(&self) {
        let mut s = self.lock();
        s.parked += 1;
        self.changed.notify_all();
        while s.target != Target::Exit {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a vCPU thread reports to the VMM besides device requests.
pub trait VcpuFailureSink: Send + Sync {
    fn vcpu_failed(&self, id: u32, message: String);
}

/// One vCPU as the controller sees it.
struct VcpuHandle {
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    tid: Arc<AtomicI32>,
}

/// All vCPU threads of a VM.
pub struct Vcpus {
    control: Arc<RunControl>,
    handles: Vec<VcpuHandle>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does
/// nothing: the interrupted ioctl returning EINTR is the point).
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpusError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result.map_err(VcpusError::Signal)
}

/// Auto-converge's brake (QEMU's cpu throttle): how long a vCPU thread
/// sleeps after each [`THROTTLE_SLICE`] it ran; zero when not throttled.
pub trait Throttle: Send + Sync {
    fn sleep_per_slice(&self) -> Duration;
}

/// No throttle.
pub struct Unthrottled;

impl Throttle for Unthrottled {
    fn sleep_per_slice(&self) -> Duration {
        Duration::ZERO
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub buses: Arc<IoBuses>,
    pub requests: Arc<dyn VmRequestSink>,
    pub failures: Arc<dyn VcpuFailureSink>,
    pub throttle: Arc<dyn Throttle>,
}

/// Kicks every vCPU thread out of KVM_RUN from any thread (a throttled
/// vCPU that never exits on its own then gets to sleep).
#[derive(Clone)]
pub struct Kicker(Vec<libc::pthread_t>);

impl Kicker {
    pub fn kick(&self) {
        for &thread in &self.0 {
            // SAFETY: the pthread_t values belong to vCPU threads, which
            // live until the VM ends; pthread_kill on an ended thread
            // returns ESRCH and does nothing.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

impl Vcpus {
    /// Starts one thread per vCPU; they run at once, or with `paused` wait
    /// for [`Vcpus::resume`] before their first KVM_RUN.
    pub fn start(fds: Vec<VcpuFd>, ctx: VcpuContext, paused: bool) -> Result<Self, VcpusError> {
        install_kick_handler()?;
        let control = Arc::new(RunControl {
            shared: Mutex::new(Shared {
                target: if paused { Target::Pause } else { Target::Run },
                parked: 0,
            }),
            changed: Condvar::new(),
        });
        let ctx = Arc::new(ctx);
        let mut handles = Vec::with_capacity(fds.len());
        for (id, fd) in (0u32..).zip(fds) {
            let fd = Arc::new(Mutex::new(fd));
            let tid = Arc::new(AtomicI32::new(0));
            let thread = {
                let (fd, tid, control, ctx) =
                    (fd.clone(), tid.clone(), control.clone(), ctx.clone());
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || vcpu_thread(id, &fd, &tid, &control, &ctx))
                    .map_err(|source| VcpusError::Spawn { id, source })?
            };
            handles.push(VcpuHandle {
                fd,
                thread: Some(thread),
                tid,
            });
        }
        Ok(Vcpus { control, handles })
    }

    fn kick_all(&self) {
        for h in &self.handles {
            if let Some(thread) = &h.thread {
                // An error means the thread already ended: nothing to kick.
                let _ = thread.kill(kick_signal());
            }
        }
    }

    fn set_target(&self, target: Target) {
        self.control.lock().target = target;
        self.control.changed.notify_all();
    }

    /// Stops every vCPU and returns once none is in KVM_RUN.
    pub fn pause(&self) {
        self.set_target(Target::Pause);
        let mut s = self.control.lock();
        while s.parked < self.handles.len() {
            drop(s);
            self.kick_all();
            s = self.control.lock();
            // A kick can land just before a thread enters KVM_RUN and be
            // lost; waking up every millisecond re-kicks until all park.
            s = self
                .control
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// A handle that kicks the vCPU threads, usable from other threads.
    pub fn kicker(&self) -> Kicker {
        Kicker(
            (self.handles.iter())
                .filter_map(|h| h.thread.as_ref().map(|t| t.as_pthread_t()))
                .collect(),
        )
    }

    /// Lets every paused vCPU run again.
    pub fn resume(&self) {
        self.set_target(Target::Run);
    }

    /// The vCPU fds, for state save and restore while paused.
    pub fn fds(&self) -> impl Iterator<Item = &Arc<Mutex<VcpuFd>>> {
        self.handles.iter().map(|h| &h.fd)
    }

    /// Linux thread ids of the vCPU threads (for pinning and cgroups).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.handles
            .iter()
            .map(|h| {
                let mut tid = h.tid.load(Ordering::Acquire);
                while tid == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                    tid = h.tid.load(Ordering::Acquire);
                }
                tid
            })
            .collect()
    }

    /// Ends every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        self.set_target(Target::Exit);
        self.kick_all();
        for h in &mut self.handles {
            if let Some(thread) = h.thread.take() {
                // A vCPU thread never panics on guest input; if it did, the
                // VM is ending anyway.
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn vcpu_thread(
    id: u32,
    fd: &Mutex<VcpuFd>,
    tid: &AtomicI32,
    control: &RunControl,
    ctx: &VcpuContext,
) {
    // SAFETY: gettid has no arguments and cannot fail.
    tid.store(unsafe { libc::gettid() }, Ordering::Release);
    let mut slice_start = Instant::now();
    while control.wait_runnable() {
        let outcome = {
            let mut fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            run_once(&mut fd, id, &ctx.buses)
        };
        match outcome {
            Outcome::Continue => {
                if slice_start.elapsed() >= THROTTLE_SLICE {
                    std::thread::sleep(ctx.throttle.sleep_per_slice());
                    slice_start = Instant::now();
                }
            }
            Outcome::Request(request) => {
                ctx.requests.request(request);
                control.park_until_exit();
                return;
            }
            Outcome::Failed(message) => {
                ctx.failures.vcpu_failed(id, message);
                control.park_until_exit();
                return;
            }
        }
    }
}

/// What one KVM_RUN ended with, once handled.
enum Outcome {
    Continue,
    /// The vCPU cannot go on: the machine must reset or power off.
    Request(VmRequest),
    Failed(String),
}

fn run_once(fd: &mut VcpuFd, id: u32, buses: &IoBuses) -> Outcome {
    let outcome = match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            buses.pio.read(port.into(), data);
            Outcome::Continue
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            buses.pio.write(port.into(), data);
            Outcome::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            buses.mmio.read(addr, data);
            Outcome::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            buses.mmio.write(addr, data);
            Outcome::Continue
        }
        // A triple fault: a PC resets.
        Ok(VcpuExit::Shutdown) => Outcome::Request(VmRequest::Reset),
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Request(VmRequest::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Request(VmRequest::Reset),
            other => Outcome::Failed(format!("system event {other} (guest crash)")),
        },
        // With the in-kernel LAPIC, HLT only exits when KVM cannot wait.
        Ok(VcpuExit::Hlt) => Outcome::Continue,
        Ok(VcpuExit::InternalError) => Outcome::Failed(String::new()),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Outcome::Failed(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
        )),
        Ok(other) => Outcome::Failed(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Outcome::Continue,
        Err(e) => Outcome::Failed(format!("KVM_RUN: {e}")),
    };
    match outcome {
        Outcome::Failed(message) => Outcome::Failed(describe_failure(fd, id, message)),
        other => other,
    }
}

/// A one-line account of a fatal exit, with where the guest was.
fn describe_failure(fd: &mut VcpuFd, id: u32, message: String) -> String {
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
    let run = fd.get_kvm_run();
    let message = if message.is_empty() && run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR
    {
        // SAFETY: exit_reason says the `internal` member of the union is valid.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        let what = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            "the host's instruction emulator failed (try --cpu-profile pvm-compat)"
        } else {
            "KVM internal error"
        };
        format!("{what} (KVM_EXIT_INTERNAL_ERROR suberror {suberror})")
    } else {
        message
    };
    format!("vCPU {id} stopped at rip {rip:#x}: {message}")
}

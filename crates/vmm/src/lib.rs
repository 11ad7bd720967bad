//! `oxvirt vmm`: one KVM virtual machine in the foreground.
//!
//! [`run`] creates the VM ([`vm::Vm`]), serves the control socket
//! ([`api`]) and waits on one channel for what ends or changes the run:
//! device requests (debug-exit, power-off, reset), vCPU failures and API
//! commands. See docs/vmm.md for the exit-status contract.

pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod device_manager;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod vcpu;
pub mod vcpus;
pub mod vm;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;

use devices::legacy::{VmRequest, VmRequestSink};
use serde_json::{json, Value};

use crate::api::{ApiRequest, ApiServer, Command, CommandError, Reply};
use crate::config::VmConfig;
use crate::console::Console;
use crate::vcpus::VcpuFailureSink;
use crate::vm::{Sinks, Vm};

/// Errors of a VMM run: set-up failures and fatal guest exits.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error("{0}")]
    Vcpu(String),
}

/// How the VM ended without a VMM error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or KVM's shutdown event).
    PowerOff,
    /// The guest wrote a value to the debug-exit port.
    DebugExit(u32),
    /// The guest asked for a reset (i8042, triple fault); like QEMU with
    /// `-no-reboot`, the VMM then exits instead of rebooting.
    GuestReset,
    /// `quit` on the control socket.
    Quit,
}

impl VmExit {
    /// The process exit status: 0, or `(v << 1) | 1` for debug-exit `v`
    /// (QEMU's isa-debug-exit formula, truncated to 8 bits as exit codes are).
    pub fn status(self) -> u8 {
        match self {
            VmExit::DebugExit(v) => ((v << 1) | 1) as u8,
            VmExit::PowerOff | VmExit::GuestReset | VmExit::Quit => 0,
        }
    }
}

/// Everything the main loop reacts to.
enum Event {
    Guest(VmRequest),
    VcpuFailed(String),
    Api(ApiRequest),
}

/// Delivers device requests and vCPU failures to the main loop.
struct EventSink(Mutex<Sender<Event>>);

impl EventSink {
    fn send(&self, event: Event) {
        // The receiver lives until the run ends; later events do not matter.
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).send(event);
    }
}

impl VmRequestSink for EventSink {
    fn request(&self, request: VmRequest) {
        self.send(Event::Guest(request));
    }
}

impl VcpuFailureSink for EventSink {
    fn vcpu_failed(&self, _id: u32, message: String) {
        self.send(Event::VcpuFailed(message));
    }
}

/// Runs the VM until it ends; returns how it ended.
pub fn run(config: &VmConfig) -> Result<VmExit, VmmError> {
    let (tx, rx) = mpsc::channel();
    let sink = std::sync::Arc::new(EventSink(Mutex::new(tx.clone())));
    let console = Console::open(&config.serial)?;
    let api = match &config.api {
        Some(path) => {
            let tx = Mutex::new(tx);
            Some(ApiServer::start(path, move |req| {
                let _ = tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(Event::Api(req));
            })?)
        }
        None => None,
    };
    let mut vm = Vm::start(
        config,
        console,
        Sinks {
            requests: sink.clone(),
            failures: sink,
        },
    )?;
    let result = main_loop(&mut vm, &rx, api.as_ref());
    if let (Ok(exit), Some(api)) = (&result, &api) {
        api.emit("SHUTDOWN", shutdown_data(*exit));
    }
    vm.stop();
    result
}

fn shutdown_data(exit: VmExit) -> Value {
    let (guest, reason) = match exit {
        VmExit::PowerOff | VmExit::DebugExit(_) => (true, "guest-shutdown"),
        VmExit::GuestReset => (true, "guest-reset"),
        VmExit::Quit => (false, "host-qmp-quit"),
    };
    json!({"guest": guest, "reason": reason})
}

fn main_loop(
    vm: &mut Vm,
    rx: &Receiver<Event>,
    api: Option<&ApiServer>,
) -> Result<VmExit, VmmError> {
    let emit = |event: &str, data: Value| {
        if let Some(api) = api {
            api.emit(event, data);
        }
    };
    loop {
        let Ok(event) = rx.recv() else {
            // Every sender is gone: nothing can end the VM any more.
            return Err(VmmError::Vcpu("internal: event channel closed".into()));
        };
        match event {
            Event::Guest(VmRequest::DebugExit(v)) => return Ok(VmExit::DebugExit(v)),
            Event::Guest(VmRequest::PowerOff) => return Ok(VmExit::PowerOff),
            Event::Guest(VmRequest::Reset) => return Ok(VmExit::GuestReset),
            Event::VcpuFailed(message) => return Err(VmmError::Vcpu(message)),
            Event::Api(request) => {
                if request.command == Command::Quit {
                    return Ok(VmExit::Quit);
                }
                let reply = execute(vm, request.command, &emit);
                // A client that hung up does not need its answer.
                let _ = request.reply.send(reply);
            }
        }
    }
}

fn execute(vm: &mut Vm, command: Command, emit: &impl Fn(&str, Value)) -> Reply {
    match command {
        Command::QueryStatus => {
            let status = if vm.is_paused() { "paused" } else { "running" };
            Ok(json!({"status": status, "running": !vm.is_paused(), "singlestep": false}))
        }
        Command::Stop => {
            if !vm.is_paused() {
                vm.pause();
                emit("STOP", json!({}));
            }
            Ok(json!({}))
        }
        Command::Cont => {
            if vm.is_paused() {
                vm.resume();
                emit("RESUME", json!({}));
            }
            Ok(json!({}))
        }
        Command::SystemReset => {
            vm.reset().map_err(|e| CommandError {
                class: "GenericError",
                desc: e.to_string(),
            })?;
            emit(
                "RESET",
                json!({"guest": false, "reason": "host-qmp-system-reset"}),
            );
            Ok(json!({}))
        }
        Command::QueryCpus => Ok(Value::Array(
            vm.vcpu_thread_ids()
                .into_iter()
                .enumerate()
                .map(|(i, tid)| json!({"cpu-index": i, "thread-id": tid, "target": "x86_64"}))
                .collect(),
        )),
        Command::Quit => Ok(json!({})),
    }
}

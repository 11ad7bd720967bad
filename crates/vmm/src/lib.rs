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
pub mod device_config;
pub mod device_manager;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod outgoing;
pub mod vcpu;
pub mod vcpus;
pub mod virtio_devices;
pub mod vm;
pub mod vm_state;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use devices::legacy::{VmRequest, VmRequestSink};
use serde_json::{json, Value};

use crate::api::{ApiRequest, ApiServer, Command, CommandError, Reply};
use crate::config::VmConfig;
use crate::console::Console;
use crate::migration::MigrationControl;
use crate::outgoing::{EventSender, MigrateCommandError, Outgoing, SharedVm};
use crate::vcpus::VcpuFailureSink;
use crate::virtio_devices::TuneError;
use crate::vm::{Sinks, Vm};
use crate::vm_state::IncomingMigration;

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
    let sink = Arc::new(EventSink(Mutex::new(tx.clone())));
    let console = Console::open(&config.serial)?;
    let incoming = match &config.incoming {
        Some(uri) => Some(IncomingMigration::open(uri).map_err(vm::VmError::from)?),
        None => None,
    };
    let api = match &config.api {
        Some(path) => {
            let tx = Mutex::new(tx);
            Some(Arc::new(ApiServer::start(path, move |req| {
                let _ = tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(Event::Api(req));
            })?))
        }
        None => None,
    };
    let control = Arc::new(MigrationControl::default());
    let vm = Vm::start(
        config,
        console,
        Sinks {
            requests: sink.clone(),
            failures: sink,
            throttle: control.clone(),
        },
        incoming,
    )?;
    let vm = Arc::new(Mutex::new(vm));
    let emit: EventSender = match &api {
        Some(api) => {
            let api = api.clone();
            Arc::new(move |event: &str, data: Value| api.emit(event, data))
        }
        None => Arc::new(|_: &str, _: Value| {}),
    };
    let mut state = LoopState {
        vm: vm.clone(),
        outgoing: Outgoing::new(control),
        emit: emit.clone(),
    };
    let result = main_loop(&mut state, &rx);
    if let Ok(exit) = &result {
        emit("SHUTDOWN", shutdown_data(*exit));
    }
    state.outgoing.cancel();
    vm.lock().unwrap_or_else(|p| p.into_inner()).stop();
    result
}

/// What the main loop works on.
struct LoopState {
    vm: SharedVm,
    outgoing: Outgoing,
    emit: EventSender,
}

impl LoopState {
    fn vm(&self) -> std::sync::MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn shutdown_data(exit: VmExit) -> Value {
    let (guest, reason) = match exit {
        VmExit::PowerOff | VmExit::DebugExit(_) => (true, "guest-shutdown"),
        VmExit::GuestReset => (true, "guest-reset"),
        VmExit::Quit => (false, "host-qmp-quit"),
    };
    json!({"guest": guest, "reason": reason})
}

fn main_loop(state: &mut LoopState, rx: &Receiver<Event>) -> Result<VmExit, VmmError> {
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
                let reply = execute(state, request.command, &request.args);
                // A client that hung up does not need its answer.
                let _ = request.reply.send(reply);
            }
        }
    }
}

fn execute(state: &mut LoopState, command: Command, args: &Value) -> Reply {
    let emit = &state.emit;
    match command {
        Command::QueryStatus => {
            let paused = state.vm().is_paused();
            let status = match (paused, state.outgoing.completed()) {
                (true, true) => "postmigrate",
                (true, false) => "paused",
                (false, _) => "running",
            };
            Ok(json!({"status": status, "running": !paused, "singlestep": false}))
        }
        Command::Stop => {
            let mut vm = state.vm();
            if !vm.is_paused() {
                vm.pause();
                emit("STOP", json!({}));
            }
            Ok(json!({}))
        }
        Command::Cont => {
            let mut vm = state.vm();
            if vm.is_paused() {
                vm.resume();
                emit("RESUME", json!({}));
            }
            Ok(json!({}))
        }
        Command::SystemReset => {
            state.vm().reset().map_err(|e| CommandError {
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
            state
                .vm()
                .vcpu_thread_ids()
                .into_iter()
                .enumerate()
                .map(|(i, tid)| json!({"cpu-index": i, "thread-id": tid, "target": "x86_64"}))
                .collect(),
        )),
        Command::Quit => Ok(json!({})),
        Command::QueryBlock => Ok(state.vm().virtio().query_block()),
        Command::QueryBlockstats => Ok(state.vm().virtio().query_blockstats()),
        Command::QueryNet => Ok(state.vm().virtio().query_net()),
        Command::BlockSetIoThrottle => tuned(state.vm().virtio().set_block_throttle(args)),
        Command::NetSetThrottle => tuned(state.vm().virtio().set_net_throttle(args)),
        Command::SetLink => tuned(state.vm().virtio().set_link(args)),
        Command::Migrate => {
            let (vm, emit) = (state.vm.clone(), state.emit.clone());
            migration_reply(state.outgoing.start(&vm, args, emit))
        }
        Command::MigrateCancel => {
            state.outgoing.cancel();
            Ok(json!({}))
        }
        Command::QueryMigrate => Ok(state.outgoing.query()),
        Command::MigrateSetCapabilities => migration_reply(state.outgoing.set_capabilities(args)),
        Command::QueryMigrateCapabilities => Ok(state.outgoing.query_capabilities()),
        Command::MigrateSetParameters => migration_reply(state.outgoing.set_parameters(args)),
        Command::QueryMigrateParameters => Ok(state.outgoing.query_parameters()),
    }
}

fn migration_reply(result: Result<(), MigrateCommandError>) -> Reply {
    result.map(|()| json!({})).map_err(|e| CommandError {
        class: "GenericError",
        desc: e.to_string(),
    })
}

/// A device-tuning command's reply, errors in QMP's classes.
fn tuned(result: Result<(), TuneError>) -> Reply {
    result.map(|()| json!({})).map_err(|e| CommandError {
        class: match e {
            TuneError::NotFound(_) => "DeviceNotFound",
            TuneError::Invalid(_) => "GenericError",
        },
        desc: e.to_string(),
    })
}

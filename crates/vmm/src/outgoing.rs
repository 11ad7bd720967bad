//! Outgoing migrations of the running VM: the control-API side (`migrate`,
//! `migrate_cancel`, `query-migrate`, capabilities and parameters) and the
//! thread that runs the engine against the VM ([`LiveVm`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::GuestMemory;
use serde_json::{json, Map, Value};

use crate::migration::source::THROTTLE_SLICE;
use crate::migration::{
    self, Capabilities, DirtyBitmap, MigratableVm, MigrationControl, MigrationStatus, MigrationUri,
    Parameters, SavedState, VmOpError,
};
use crate::vcpus::Throttle;
use crate::vm::Vm;

/// A shared VM: the main loop and a migration thread take turns.
pub type SharedVm = Arc<Mutex<Vm>>;

fn lock(vm: &SharedVm) -> MutexGuard<'_, Vm> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where MIGRATION and MIGRATION_PASS events go.
pub type EventSender = Arc<dyn Fn(&str, Value) + Send + Sync>;

impl Throttle for MigrationControl {
    fn sleep_per_slice(&self) -> Duration {
        self.throttle_sleep()
    }
}

/// The engine's view of the running VM.
struct LiveVm {
    vm: SharedVm,
    memory: GuestMemory,
    /// The VM was paused before the migration: it stays paused after a
    /// failed one (a `stop` then `migrate file:` is how a VM is saved).
    was_paused: bool,
}

impl MigratableVm for LiveVm {
    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmOpError> {
        let mut vm = lock(&self.vm);
        let (fd, ram) = vm.ram();
        Ok(ram.set_dirty_logging(fd, enable)?)
    }

    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, VmOpError> {
        let mut vm = lock(&self.vm);
        let (fd, ram) = vm.ram();
        Ok(ram.take_dirty_pages(fd)?)
    }

    fn pause(&mut self) {
        lock(&self.vm).quiesce();
    }

    fn resume(&mut self) {
        let mut vm = lock(&self.vm);
        vm.unquiesce();
        if self.was_paused {
            vm.pause();
        }
    }

    fn save_state(&mut self) -> Result<SavedState, VmOpError> {
        Ok(lock(&self.vm).save_state()?)
    }
}

/// Errors of the migration commands, as QMP's GenericError.
#[derive(Debug, thiserror::Error)]
pub enum MigrateCommandError {
    #[error("There's a migration process in progress")]
    InProgress,
    #[error("{0}")]
    Invalid(String),
}

/// The outgoing-migration side of the control API.
pub struct Outgoing {
    control: Arc<MigrationControl>,
    caps: Capabilities,
    params: Parameters,
    thread: Option<JoinHandle<()>>,
    completed: Arc<AtomicBool>,
}

impl Outgoing {
    pub fn new(control: Arc<MigrationControl>) -> Self {
        Outgoing {
            control,
            caps: Capabilities::default(),
            params: Parameters::default(),
            thread: None,
            completed: Arc::default(),
        }
    }

    /// A migration runs (its thread may outlive the final status a little).
    fn active(&self) -> bool {
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        let ended = matches!(
            self.control.info().status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        );
        running && !ended
    }

    /// A migration completed: the guest runs elsewhere (QMP's postmigrate).
    pub fn completed(&self) -> bool {
        self.completed.load(Ordering::SeqCst)
    }

    /// `migrate {"uri"}`: starts the engine on its own thread.
    pub fn start(
        &mut self,
        vm: &SharedVm,
        args: &Value,
        events: EventSender,
    ) -> Result<(), MigrateCommandError> {
        if self.active() {
            return Err(MigrateCommandError::InProgress);
        }
        if let Some(previous) = self.thread.take() {
            // Its status is final: it is only returning.
            let _ = previous.join();
        }
        let uri: MigrationUri = (args.get("uri").and_then(Value::as_str))
            .ok_or_else(|| MigrateCommandError::Invalid("Parameter 'uri' is missing".into()))?
            .parse()
            .map_err(|e: migration::TransportError| MigrateCommandError::Invalid(e.to_string()))?;
        self.caps
            .validate()
            .map_err(|e| MigrateCommandError::Invalid(e.to_string()))?;
        let (memory, was_paused, kicker) = {
            let mut guard = lock(vm);
            let memory = guard.ram().1.memory().clone();
            (memory, guard.is_paused(), guard.kicker())
        };
        let mut live = LiveVm {
            vm: vm.clone(),
            memory,
            was_paused,
        };
        let (control, caps, params) = (self.control.clone(), self.caps, self.params);
        let completed = self.completed.clone();
        completed.store(false, Ordering::SeqCst);
        control.begin();
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let done = AtomicBool::new(false);
                std::thread::scope(|scope| {
                    // A throttled vCPU that never exits must still sleep.
                    scope.spawn(|| {
                        while !done.load(Ordering::Relaxed) {
                            std::thread::sleep(THROTTLE_SLICE);
                            if control.throttle_percentage() > 0 {
                                kicker.kick();
                            }
                        }
                    });
                    let result =
                        migration::migrate(&mut live, &uri, caps, params, &control, &*events);
                    done.store(true, Ordering::Relaxed);
                    completed.store(result.is_ok(), Ordering::SeqCst);
                });
            })
            .map_err(|e| MigrateCommandError::Invalid(format!("starting the migration: {e}")))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// `migrate_cancel` (nothing to do when no migration runs, as in QEMU).
    pub fn cancel(&self) {
        if self.active() {
            self.control.cancel();
        }
    }

    /// `query-migrate`: `{}` before any migration, as QEMU answers.
    pub fn query(&self) -> Value {
        let info = self.control.info();
        if info.status == MigrationStatus::None {
            return json!({});
        }
        serde_json::to_value(info).unwrap_or_default()
    }

    /// `migrate-set-capabilities {"capabilities": [{"capability", "state"}]}`.
    pub fn set_capabilities(&mut self, args: &Value) -> Result<(), MigrateCommandError> {
        if self.active() {
            return Err(MigrateCommandError::InProgress);
        }
        let list = (args.get("capabilities").and_then(Value::as_array)).ok_or_else(|| {
            MigrateCommandError::Invalid("Parameter 'capabilities' is missing".into())
        })?;
        let mut changes = Vec::with_capacity(list.len());
        for item in list {
            let name = item.get("capability").and_then(Value::as_str);
            let state = item.get("state").and_then(Value::as_bool);
            let (Some(name), Some(state)) = (name, state) else {
                return Err(MigrateCommandError::Invalid(format!(
                    "expected {{\"capability\": NAME, \"state\": BOOL}}, got {item}"
                )));
            };
            changes.push((name.to_owned(), Value::Bool(state)));
        }
        let caps = with_changes(&self.caps, changes, "capability")?;
        caps.validate()
            .map_err(|e| MigrateCommandError::Invalid(e.to_string()))?;
        self.caps = caps;
        Ok(())
    }

    pub fn query_capabilities(&self) -> Value {
        let caps = to_object(&self.caps).into_iter();
        Value::Array(
            caps.map(|(name, state)| json!({"capability": name, "state": state}))
                .collect(),
        )
    }

    /// `migrate-set-parameters`: QEMU's names, unnamed ones unchanged.
    pub fn set_parameters(&mut self, args: &Value) -> Result<(), MigrateCommandError> {
        let given = args.as_object().cloned().unwrap_or_default();
        let params = with_changes(&self.params, given, "parameter")?;
        params
            .validate()
            .map_err(|e| MigrateCommandError::Invalid(e.to_string()))?;
        self.params = params;
        Ok(())
    }

    pub fn query_parameters(&self) -> Value {
        Value::Object(to_object(&self.params))
    }
}

fn to_object<T: serde::Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// `current` with `changes` applied one at a time, so that an error names
/// the capability or parameter it is about (serde's own may not).
fn with_changes<T: serde::Serialize + serde::de::DeserializeOwned>(
    current: &T,
    changes: impl IntoIterator<Item = (String, Value)>,
    what: &str,
) -> Result<T, MigrateCommandError> {
    let mut merged = to_object(current);
    let mut result = serde_json::from_value(Value::Object(merged.clone()));
    for (name, value) in changes {
        merged.insert(name.clone(), value);
        result = serde_json::from_value(Value::Object(merged.clone()));
        if let Err(e) = &result {
            return Err(MigrateCommandError::Invalid(format!(
                "migration {what} {name:?}: {e}"
            )));
        }
    }
    result.map_err(|e| MigrateCommandError::Invalid(format!("migration {what}s: {e}")))
}

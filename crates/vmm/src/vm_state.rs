//! The VM's state as a migration stream carries it: one blob per vCPU
//! ([`VcpuState`]) and named device blobs (`vm`: irqchips, PIT and clock;
//! `virtio:N`: the Nth virtio transport), each JSON with its own version.
//! Saving happens on the source while quiesced; restoring on the
//! destination before its vCPUs first run.

use devices::virtio::MmioState;
use devices::GuestMemory;
use kvm_ioctls::{VcpuFd, VmFd};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::migration::{self, Incoming, MigrationUri, Received, SavedState};
use crate::vcpu::VcpuState;
use crate::virtio_devices::VirtioDevices;
use crate::vm::VmState;

/// Errors saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("incoming migration: {0}")]
    Incoming(#[from] migration::DestinationError),
    #[error("incoming migration on {uri}: {source}")]
    Transport {
        uri: String,
        source: migration::TransportError,
    },
    #[error("incoming migration: {0}")]
    Mismatch(String),
    #[error("incoming migration: state blob {name}: {problem}")]
    Blob { name: String, problem: String },
    #[error("saving VM state: {0}")]
    Save(String),
    #[error("incoming migration: {0}")]
    Disk(#[from] crate::virtio_devices::VirtioError),
}

const VM_BLOB: &str = "vm";

fn virtio_blob(index: usize) -> String {
    format!("virtio:{index}")
}

fn encode<T: Serialize>(name: &str, value: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value).map_err(|e| StateError::Save(format!("{name}: {e}")))
}

fn decode<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Blob {
        name: name.to_owned(),
        problem: e.to_string(),
    })
}

/// Everything but RAM, taken while the VM is quiesced; disks are flushed.
pub fn save(
    vcpus: &[VcpuState],
    vm: &VmState,
    virtio: &VirtioDevices,
) -> Result<SavedState, StateError> {
    virtio.flush_disks().map_err(StateError::Save)?;
    let mut devices = vec![(VM_BLOB.to_owned(), encode(VM_BLOB, vm)?)];
    for (index, mut slot) in virtio.slots().enumerate() {
        let name = virtio_blob(index);
        devices.push((name.clone(), encode(&name, &slot.save())?));
    }
    let vcpus = (vcpus.iter())
        .map(|v| encode("vcpu", v))
        .collect::<Result<_, _>>()?;
    Ok(SavedState { vcpus, devices })
}

/// An incoming migration whose listener (or command, or file) is open:
/// opened before the control socket, so a client that sees the socket can
/// start the source at once.
pub struct IncomingMigration {
    uri: MigrationUri,
    incoming: Incoming,
}

impl IncomingMigration {
    pub fn open(uri: &MigrationUri) -> Result<Self, StateError> {
        let incoming = Incoming::open(uri).map_err(|source| StateError::Transport {
            uri: uri.to_string(),
            source,
        })?;
        tracing::info!("waiting for an incoming migration on {uri}");
        Ok(IncomingMigration {
            uri: uri.clone(),
            incoming,
        })
    }

    /// Waits for the stream and writes it into `memory`.
    pub fn receive(mut self, memory: &GuestMemory, vcpus: u32) -> Result<Received, StateError> {
        let received = migration::receive(&mut self.incoming, &self.uri, memory)?;
        if received.vcpus.len() != vcpus as usize {
            let reason = format!(
                "the source has {} vCPUs, this VM {vcpus}",
                received.vcpus.len()
            );
            received.reject(&reason);
            return Err(StateError::Mismatch(reason));
        }
        Ok(received)
    }
}

/// Restores vCPUs, VM-wide state and devices from what arrived, then
/// confirms to the source (or tells it why not, so it runs on).
pub fn restore(
    received: Received,
    vm: &VmFd,
    vcpu_fds: &[VcpuFd],
    virtio: &VirtioDevices,
) -> Result<(), StateError> {
    let started = std::time::Instant::now();
    match load(&received, vm, vcpu_fds, virtio) {
        Ok(()) => {
            let loaded = started.elapsed();
            received.confirm()?;
            tracing::debug!(
                load_us = loaded.as_micros() as u64,
                confirm_us = started.elapsed().as_micros() as u64,
                "incoming migration state loaded"
            );
            Ok(())
        }
        Err(e) => {
            received.reject(&e.to_string());
            Err(e)
        }
    }
}

fn load(
    received: &Received,
    vm: &VmFd,
    vcpu_fds: &[VcpuFd],
    virtio: &VirtioDevices,
) -> Result<(), StateError> {
    let blob = |name: &str| {
        (received.devices.iter().find(|(n, _)| n == name))
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| StateError::Mismatch(format!("the stream has no {name} state")))
    };
    virtio.reopen_disks()?;
    let vm_state: VmState = decode(VM_BLOB, blob(VM_BLOB)?)?;
    let blob_err = |name: &str| {
        let name = name.to_owned();
        move |e: &dyn std::fmt::Display| StateError::Blob {
            name,
            problem: e.to_string(),
        }
    };
    for (id, (fd, bytes)) in vcpu_fds.iter().zip(&received.vcpus).enumerate() {
        let state: VcpuState = decode("vcpu", bytes)?;
        state
            .restore(fd)
            .map_err(|e| blob_err(&format!("vcpu {id}"))(&e))?;
    }
    vm_state
        .restore(vm, true)
        .map_err(|e| blob_err(VM_BLOB)(&e))?;
    let slots = virtio.slots().count();
    let saved_slots = (received.devices.iter())
        .filter(|(n, _)| n.starts_with("virtio:"))
        .count();
    if saved_slots != slots {
        return Err(StateError::Mismatch(format!(
            "the source has {saved_slots} virtio devices, this VM {slots}"
        )));
    }
    for (index, mut slot) in virtio.slots().enumerate() {
        let name = virtio_blob(index);
        let state: MmioState = decode(&name, blob(&name)?)?;
        slot.load_state(&state).map_err(|e| blob_err(&name)(&e))?;
        slot.resume();
    }
    Ok(())
}

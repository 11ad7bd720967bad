//! One virtual machine: KVM VM with in-kernel irqchip and PIT, guest RAM,
//! devices, loaded kernel and vCPU threads, plus reset and state capture.

use std::sync::{Arc, Mutex};

use devices::legacy::{Serial, VmRequestSink};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::boot::{self, BootSpec};
use crate::config::VmConfig;
use crate::console::Console;
use crate::cpuid;
use crate::device_manager::DeviceManager;
use crate::layout;
use crate::memory::GuestRam;
use crate::vcpu::{self, VcpuState};
use crate::vcpus::{Kicker, Throttle, VcpuContext, VcpuFailureSink, Vcpus};
use crate::virtio_devices::{VirtioDevices, VirtioError};
use crate::vm_state::IncomingMigration;

/// Errors creating or driving the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vcpus {wanted}: this host's KVM allows at most {max}")]
    TooManyVcpus { wanted: u32, max: u32 },
    #[error("memory {size} bytes: more than this host's RAM plus swap ({host} bytes)")]
    MemoryTooLarge { size: u64, host: u64 },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Vcpus(#[from] crate::vcpus::VcpusError),
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error(transparent)]
    State(#[from] crate::vm_state::StateError),
    #[error("VM state version {found} is not the supported version {supported}")]
    StateVersion { found: u32, supported: u32 },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The highest vCPU count: APIC IDs are 8 bits in the MADT and xAPIC mode.
const MAX_VCPUS: u32 = 254;

/// The version of [`VmState`]'s layout; bump on any change.
pub const VM_STATE_VERSION: u32 = 1;

/// VM-wide KVM state: PIC (master, slave), IOAPIC, PIT and kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            version: VM_STATE_VERSION,
            irqchips,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores interrupt controllers and PIT (the clock only on request:
    /// a reset keeps time running).
    pub fn restore(&self, vm: &VmFd, with_clock: bool) -> Result<(), VmError> {
        if self.version != VM_STATE_VERSION {
            return Err(VmError::StateVersion {
                found: self.version,
                supported: VM_STATE_VERSION,
            });
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        if with_clock {
            vm.set_clock(&self.clock)
                .map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}

/// Where the VM's threads report to the VMM's main loop.
pub struct Sinks {
    pub requests: Arc<dyn VmRequestSink>,
    pub failures: Arc<dyn VcpuFailureSink>,
    /// Auto-converge's brake on the vCPU threads.
    pub throttle: Arc<dyn Throttle>,
}

/// A created, running VM.
pub struct Vm {
    fd: VmFd,
    ram: GuestRam,
    boot: BootSpec,
    vcpus: Vcpus,
    /// vCPU and VM state right after set-up: what a reset goes back to.
    boot_vcpus: Vec<VcpuState>,
    boot_vm: VmState,
    /// The MSRs KVM saves and restores, for state capture.
    msr_indices: Vec<u32>,
    serial: Arc<Mutex<Serial>>,
    virtio: VirtioDevices,
    paused: bool,
}

impl Vm {
    /// Creates the VM and starts the vCPUs: from the kernel, or, with
    /// `incoming`, from the state an incoming migration brings (disks are
    /// opened again after the stream, so they are read fresh). With
    /// `config.paused` the vCPUs wait for [`Vm::resume`] either way.
    pub fn start(
        config: &VmConfig,
        console: Console,
        sinks: Sinks,
        incoming: Option<IncomingMigration>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        check_limits(&kvm, config)?;
        let fd = create_vm(&kvm)?;
        let ram = GuestRam::new(&fd, config.memory)?;
        let mut devices = DeviceManager::new(&fd, console.output, sinks.requests.clone())?;
        let virtio = VirtioDevices::attach(
            &config.disks,
            &config.nics,
            config.rng,
            &fd,
            ram.memory(),
            &mut devices,
        )?;
        let mut cmdline = config.cmdline.clone();
        for param in devices.cmdline_params() {
            cmdline.push(' ');
            cmdline.push_str(&param);
        }
        let boot = BootSpec {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline,
            vcpus: config.vcpus,
        };
        let entry = boot::load(ram.memory(), ram.size(), &boot)?;
        let base_cpuid = cpuid::supported(&kvm, config.cpu_profile)?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let mut fds = Vec::with_capacity(config.vcpus as usize);
        let mut boot_vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(id.into())
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure(&vcpu, id, &cpuid::for_vcpu(&base_cpuid, id, config.vcpus))?;
            if id == 0 {
                vcpu::set_boot_registers(&vcpu, id, &entry)?;
            }
            boot_vcpus.push(VcpuState::save(&vcpu, id, &msr_indices)?);
            fds.push(vcpu);
        }
        let boot_vm = VmState::save(&fd)?;
        if let Some(incoming) = incoming {
            // Everything is ready: the downtime only covers the stream's
            // tail, reopening the disks and loading the state.
            let received = incoming.receive(ram.memory(), config.vcpus)?;
            crate::vm_state::restore(received, &fd, &fds, &virtio)?;
        }
        let (buses, serial) = devices.into_buses();
        console.input.start(serial.clone());
        let vcpus = Vcpus::start(
            fds,
            VcpuContext {
                buses,
                requests: sinks.requests,
                failures: sinks.failures,
                throttle: sinks.throttle,
            },
            config.paused,
        )?;
        Ok(Vm {
            fd,
            ram,
            boot,
            vcpus,
            boot_vcpus,
            boot_vm,
            msr_indices,
            serial,
            virtio,
            paused: config.paused,
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU (they leave KVM_RUN before this returns).
    pub fn pause(&mut self) {
        if !self.paused {
            self.vcpus.pause();
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if self.paused {
            self.vcpus.resume();
            self.paused = false;
        }
    }

    /// A machine reset: clean RAM, the kernel loaded again, vCPUs and
    /// interrupt controllers as at power-on. A paused VM stays paused.
    pub fn reset(&mut self) -> Result<(), VmError> {
        let was_paused = self.paused;
        self.pause();
        // Device workers stop before the RAM they write to is cleared.
        for mut slot in self.virtio.slots() {
            slot.reset();
        }
        self.ram.discard_all()?;
        boot::load(self.ram.memory(), self.ram.size(), &self.boot)?;
        for (fd, state) in self.vcpus.fds().zip(&self.boot_vcpus) {
            state.restore(&fd.lock().unwrap_or_else(|p| p.into_inner()))?;
        }
        self.boot_vm.restore(&self.fd, false)?;
        if !was_paused {
            self.resume();
        }
        Ok(())
    }

    /// The vCPU threads' Linux thread ids, by vCPU index.
    pub fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.vcpus.thread_ids()
    }

    /// The serial device (for saving its state).
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// The virtio devices (for the control API).
    pub fn virtio(&self) -> &VirtioDevices {
        &self.virtio
    }

    /// The guest RAM (for dirty tracking and migration).
    pub fn ram(&mut self) -> (&VmFd, &mut GuestRam) {
        (&self.fd, &mut self.ram)
    }

    /// Stops the vCPUs and then the device workers: nothing writes guest
    /// memory or disks until [`Vm::unquiesce`] (a migration's last stage).
    pub fn quiesce(&mut self) {
        self.pause();
        for mut slot in self.virtio.slots() {
            slot.pause();
        }
    }

    pub fn unquiesce(&mut self) {
        for mut slot in self.virtio.slots() {
            slot.resume();
        }
        self.resume();
    }

    /// vCPU, VM-wide and device state (disks flushed); call while quiesced.
    pub fn save_state(&mut self) -> Result<crate::migration::SavedState, VmError> {
        let mut vcpus = Vec::new();
        for (id, fd) in (0u32..).zip(self.vcpus.fds()) {
            let mut fd = fd.lock().unwrap_or_else(|p| p.into_inner());
            complete_pending_io(&mut fd);
            vcpus.push(VcpuState::save(&fd, id, &self.msr_indices)?);
        }
        let vm = VmState::save(&self.fd)?;
        Ok(crate::vm_state::save(&vcpus, &vm, &self.virtio)?)
    }

    /// Kicks vCPU threads out of KVM_RUN (for the throttle).
    pub fn kicker(&self) -> Kicker {
        self.vcpus.kicker()
    }

    /// Ends the vCPU threads.
    pub fn stop(&mut self) {
        self.vcpus.stop();
    }
}

/// Lets KVM finish an I/O instruction whose exit the vCPU thread handled
/// just before it parked (KVM completes it on the next KVM_RUN): one
/// KVM_RUN with immediate_exit returns at once with the instruction done,
/// so the saved registers are past it and it is not replayed on restore.
fn complete_pending_io(fd: &mut kvm_ioctls::VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    // EINTR is the expected answer; anything else leaves the state as is.
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

fn check_limits(kvm: &Kvm, config: &VmConfig) -> Result<(), VmError> {
    let max = (kvm.get_max_vcpus() as u32).min(MAX_VCPUS);
    if config.vcpus > max {
        return Err(VmError::TooManyVcpus {
            wanted: config.vcpus,
            max,
        });
    }
    if let Some(host) = crate::config::host_memory_limit() {
        if config.memory > host {
            return Err(VmError::MemoryTooLarge {
                size: config.memory,
                host,
            });
        }
    }
    Ok(())
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(fd)
}

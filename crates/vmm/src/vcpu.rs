//! One vCPU: its initial set-up (CPUID, MSRs, FPU, LAPIC, boot registers),
//! its saved state, and the thread that runs it.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::boot::{BootEntry, EntryMode};
use crate::layout;

/// Errors setting up or saving a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {done} of {wanted} MSRs (first refused: {first:#x})")]
    Msrs {
        id: u32,
        done: usize,
        wanted: usize,
        first: u32,
    },
    #[error("vCPU state version {found} is not the supported version {supported}")]
    Version { found: u32, supported: u32 },
}

fn kvm_err(id: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets and the delivery modes Linux expects on LINT0/1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets what every vCPU needs before its first run, as a PC's firmware
/// leaves it: CPUID, MSRs, x87/SSE control words, LAPIC LINT0/LINT1.
pub fn configure(fd: &VcpuFd, id: u32, cpuid: &CpuId) -> Result<(), VcpuError> {
    fd.set_cpuid2(cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    set_boot_msrs(fd, id)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as std::os::raw::c_char;
    }
}

fn set_boot_msrs(fd: &VcpuFd, id: u32) -> Result<(), VcpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    write_msrs(fd, id, &entries)
}

fn write_msrs(fd: &VcpuFd, id: u32, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        wanted: entries.len(),
        first: entries.first().map_or(0, |e| e.index),
    })?;
    let done = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if done != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            done,
            wanted: entries.len(),
            first: entries[done].index,
        });
    }
    Ok(())
}

fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Puts the boot vCPU at the kernel's entry in the mode its protocol wants.
pub fn set_boot_registers(fd: &VcpuFd, id: u32, entry: &BootEntry) -> Result<(), VcpuError> {
    use crate::boot::tables::{CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, GDT, TSS_SELECTOR};
    const CODE_EXEC_READ_ACCESSED: u8 = 0xb;
    const DATA_READ_WRITE_ACCESSED: u8 = 0x3;
    const TSS_BUSY: u8 = 0xb;
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let long = entry.mode == EntryMode::Linux64;
    let code_selector = if long {
        CODE64_SELECTOR
    } else {
        CODE32_SELECTOR
    };
    sregs.cs = flat_segment(code_selector, CODE_EXEC_READ_ACCESSED, long);
    let data = flat_segment(DATA_SELECTOR, DATA_READ_WRITE_ACCESSED, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: TSS_BUSY,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    if long {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.cr3 = layout::PML4_ADDR;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    fd.set_sregs(&sregs).map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    let mut regs = kvm_regs {
        rip: entry.rip,
        rflags: 0x2,
        ..Default::default()
    };
    if long {
        regs.rsi = entry.info;
        regs.rsp = layout::BOOT_STACK_TOP;
        regs.rbp = layout::BOOT_STACK_TOP;
    } else {
        regs.rbx = entry.info;
    }
    fd.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))
}

/// The version of [`VcpuState`]'s layout; bump on any change.
pub const VCPU_STATE_VERSION: u32 = 1;

/// Everything KVM holds about one vCPU, for snapshots, migration and
/// machine reset (a reset restores the state saved right after set-up).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u32,
    pub id: u32,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running; `msr_indices` is the
    /// list of MSRs to save (KVM's index list; ones it refuses are skipped).
    pub fn save(fd: &VcpuFd, id: u32, msr_indices: &[u32]) -> Result<Self, VcpuError> {
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(id, "KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd
                .get_debug_regs()
                .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, id, msr_indices)?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads this state into a vCPU that is not running.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        if self.version != VCPU_STATE_VERSION {
            return Err(VcpuError::Version {
                found: self.version,
                supported: VCPU_STATE_VERSION,
            });
        }
        let id = self.id;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuError::Kvm {
            id,
            what: "CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave read by KVM_GET_XSAVE from
        // a vCPU with the same CPUID, so its size and layout match.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        write_msrs(fd, id, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))
    }
}

/// Reads every MSR in `indices` that KVM lets this vCPU read.
fn read_msrs(fd: &VcpuFd, id: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            id,
            done: 0,
            wanted: entries.len(),
            first: rest[0],
        })?;
        let done = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..done]);
        // KVM stops at the first MSR it refuses: skip that one.
        rest = rest.get(done + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

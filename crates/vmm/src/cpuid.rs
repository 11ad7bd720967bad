//! CPUID for the guest: KVM's supported set, filtered by a named profile,
//! then made per-vCPU (APIC IDs and topology leaves).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors of CPUID set-up.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("building the CPUID table: {0}")]
    Build(String),
}

/// Which CPU features the guest is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports on this host (the default).
    Host,
    /// KVM's set minus what a nested PVM host's ring-0 instruction emulator
    /// cannot execute: CMPXCHG16B, the XSAVE family and every feature that
    /// needs XSAVE-managed state (AVX, AVX2, AVX-512, FMA, F16C, AMX, ...),
    /// and no basic leaf from 0xD up. For machines like this project's
    /// (see docs/vmm.md).
    PvmCompat,
}

const LEAF_BASIC: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

/// The highest basic leaf pvm-compat shows: one below the XSAVE leaf 0xD.
///
/// A PVM host runs guest ring-3 code natively, where CPUID is not trapped,
/// so its KVM forces the guest's leaf 1 ECX feature bits it cannot hide from
/// ring 3 (XSAVE, AVX, FMA, F16C, ...), all of leaf 7 and leaf 0xD back to
/// the host's values whatever KVM_SET_CPUID2 was given (read back with
/// KVM_GET_CPUID2 on this project's machines). The highest basic leaf is
/// honoured, and Linux drops XSAVE, and with it every feature that depends
/// on it, when leaf 0xD is out of range (`filter_cpuid_features`).
const PVM_MAX_BASIC_LEAF: u32 = LEAF_XSAVE - 1;
/// Leaf 1 ECX bits the pvm-compat profile clears.
const PVM_LEAF1_ECX: u32 = (1 << 12) // FMA
    | (1 << 13) // CMPXCHG16B
    | (1 << 26) // XSAVE
    | (1 << 27) // OSXSAVE
    | (1 << 28) // AVX
    | (1 << 29); // F16C
/// Leaf 7.0 EBX: AVX2 and the AVX-512 family.
const PVM_LEAF7_EBX: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7.0 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES, VPCLMULQDQ.
const PVM_LEAF7_ECX: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7.0 EDX: AVX-512 4VNNIW/4FMAPS, AMX, AVX512-FP16.
const PVM_LEAF7_EDX: u32 = (1 << 2) | (1 << 3) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Leaf 7.1 EAX: AVX-VNNI, AVX512-BF16.
const PVM_LEAF7_1_EAX: u32 = (1 << 4) | (1 << 5);
/// Leaf 0x8000_0001 ECX: XOP, FMA4, TBM (AMD's AVX-era extensions).
const PVM_AMD_ECX: u32 = (1 << 11) | (1 << 16) | (1 << 21);

/// KVM's supported CPUID with `profile` applied; the same for every vCPU.
pub fn supported(kvm: &Kvm, profile: CpuProfile) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    if profile == CpuProfile::PvmCompat {
        apply_pvm_compat(cpuid.as_mut_slice());
    }
    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_KVM_SIGNATURE)
    {
        let mut entries = cpuid.as_slice().to_vec();
        entries.push(kvm_signature_leaf());
        cpuid = CpuId::from_entries(&entries).map_err(|e| CpuidError::Build(format!("{e:?}")))?;
    }
    Ok(cpuid)
}

fn kvm_signature_leaf() -> kvm_cpuid_entry2 {
    let sig = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    kvm_cpuid_entry2 {
        function: LEAF_KVM_SIGNATURE,
        eax: LEAF_KVM_SIGNATURE + 1,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    }
}

fn apply_pvm_compat(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries {
        match (e.function, e.index) {
            (LEAF_BASIC, _) => e.eax = e.eax.min(PVM_MAX_BASIC_LEAF),
            (LEAF_FEATURES, _) => e.ecx &= !PVM_LEAF1_ECX,
            (LEAF_EXT_FEATURES, 0) => {
                e.ebx &= !PVM_LEAF7_EBX;
                e.ecx &= !PVM_LEAF7_ECX;
                e.edx &= !PVM_LEAF7_EDX;
            }
            (LEAF_EXT_FEATURES, 1) => e.eax &= !PVM_LEAF7_1_EAX,
            (LEAF_XSAVE, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (LEAF_AMD_FEATURES, _) => e.ecx &= !PVM_AMD_ECX,
            _ => {}
        }
    }
}

/// Bits needed to number `count` things (the APIC-ID shift of a level).
fn id_bits(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// The CPUID table of vCPU `apic_id` in a VM of `vcpus` single-threaded
/// cores on one socket (APIC ID = vCPU index).
pub fn for_vcpu(base: &CpuId, apic_id: u32, vcpus: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xffff) | (vcpus.min(255) << 16) | (apic_id << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            LEAF_CACHE => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level == 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((vcpus - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (id_bits(vcpus), vcpus, 1 | (2 << 8)),
                    n => (0, 0, n),
                };
            }
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(vcpus) << 12) | (vcpus - 1).min(255);
            }
            LEAF_AMD_EXT_APIC => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn per_vcpu_ids_and_topology() {
        let base = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_AMD_SIZES, 0),
        ])
        .unwrap();
        let c = for_vcpu(&base, 2, 3);
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_ne!(l1.ecx & (1 << 31), 0);
        let core = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
        assert_eq!(find(&c, LEAF_AMD_SIZES, 0).ecx & 0xff, 2);
    }

    #[test]
    fn pvm_compat_hides_cx16_and_xsave() {
        let mut entries = [
            entry(LEAF_FEATURES, 0),
            entry(LEAF_XSAVE, 0),
            entry(LEAF_EXT_FEATURES, 0),
            entry(LEAF_BASIC, 0),
        ];
        apply_pvm_compat(&mut entries);
        assert_eq!(entries[0].ecx & (1 << 13), 0);
        assert_eq!(entries[0].ecx & (1 << 26), 0);
        assert_ne!(entries[0].ecx & 1, 0, "SSE3 stays");
        assert_eq!(entries[1].eax, 0);
        assert_eq!(entries[2].ebx & (1 << 5), 0);
        assert_eq!(entries[3].eax, 0xc);
        assert_eq!(entries[3].ebx, 0xffff_ffff, "vendor string stays");
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}

#[cfg(test)]
mod kvm_tests {
    use super::*;

    #[test]
    fn pvm_compat_table_from_kvm_has_no_xsave() {
        let Ok(kvm) = Kvm::new() else { return };
        let c = supported(&kvm, CpuProfile::PvmCompat).unwrap();
        for e in c.as_slice().iter().filter(|e| e.function == LEAF_FEATURES) {
            assert_eq!(e.ecx & ((1 << 26) | (1 << 13)), 0, "{e:?}");
        }
    }

    /// What a vCPU really gets: KVM may override feature bits (a PVM host
    /// forces XSAVE back on), but CMPXCHG16B and the leaf limit must hold.
    #[test]
    fn pvm_compat_survives_kvm_set_cpuid() {
        let Ok(kvm) = Kvm::new() else { return };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let c = supported(&kvm, CpuProfile::PvmCompat).unwrap();
        vcpu.set_cpuid2(&for_vcpu(&c, 0, 1)).unwrap();
        let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf = |f| got.as_slice().iter().find(|e| e.function == f).unwrap();
        assert!(leaf(LEAF_BASIC).eax < LEAF_XSAVE, "{:?}", leaf(LEAF_BASIC));
        assert_eq!(leaf(LEAF_FEATURES).ecx & (1 << 13), 0);
    }
}

//! Queue notifications through KVM's ioeventfd: a tiny real-mode guest
//! writes a virtio-mmio transport's QueueNotify register N times, once
//! with every write exiting to this process (the plain MMIO path) and once
//! with the transport's queue EventFd registered as an ioeventfd. The test
//! checks that the ioeventfd path reaches the device's EventFd without any
//! exit to the VMM, and prints what each notification costs.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use devices::virtio::rng::Rng;
use devices::virtio::MmioTransport;
use devices::BusDevice;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const CODE: u64 = 0x1000;
/// Guest memory covers 0..64 KiB; the device sits just above it.
const MEM_SIZE: usize = 0x1_0000;
const DEVICE_BASE: u64 = 0x1_0000;
const WRITES: u16 = 2000;

/// Real-mode code: DS = 0x1000 (the device), CX = WRITES, then
/// `mov [0x50], eax` (QueueNotify, queue 0) in a loop, then HLT.
fn guest_code() -> Vec<u8> {
    let [lo, hi] = WRITES.to_le_bytes();
    vec![
        0xb8, 0x00, 0x10, // mov ax, 0x1000
        0x8e, 0xd8, // mov ds, ax
        0xb9, lo, hi, // mov cx, WRITES
        0x66, 0x31, 0xc0, // xor eax, eax
        0x66, 0xa3, 0x50, 0x00, // l: mov [0x50], eax
        0xe2, 0xfa, // loop l
        0xf4, // hlt
    ]
}

struct Outcome {
    vmm_exits: u32,
    seconds: f64,
}

fn run_guest(vm: &VmFd, transport: &mut MmioTransport<Rng>) -> Outcome {
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    let mut vcpu = vcpu;
    let mut vmm_exits = 0;
    let start = Instant::now();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(addr, data) => {
                vmm_exits += 1;
                transport.write(addr - DEVICE_BASE, data);
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    Outcome {
        vmm_exits,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn new_vm(kvm: &Kvm, mem: &devices::GuestMemory) -> VmFd {
    let vm = kvm.create_vm().expect("create VM");
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host as u64,
    };
    // SAFETY: the region is a live mapping of `memory_size` bytes owned by
    // `mem`, which outlives the VM in this test.
    unsafe { vm.set_user_memory_region(slot).expect("memory region") };
    vm
}

#[test]
fn heavy_ioeventfd_notifications_skip_the_vmm() {
    if !testkit::require_kvm() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let mem = vm_memory::GuestMemoryMmap::<vm_memory::bitmap::AtomicBitmap>::from_ranges(&[(
        GuestAddress(0),
        MEM_SIZE,
    )])
    .unwrap();
    mem.write_slice(&guest_code(), GuestAddress(CODE)).unwrap();
    let irq = Arc::new(CountingIrq::default());
    let mut transport =
        MmioTransport::new(Rng::new(Default::default()).unwrap(), mem.clone(), irq).unwrap();
    let notify = DEVICE_BASE + MmioTransport::<Rng>::queue_notify_offset();

    let vm = new_vm(&kvm, &mem);
    let plain = run_guest(&vm, &mut transport);
    assert_eq!(plain.vmm_exits, u32::from(WRITES));
    assert_eq!(
        transport.queue_events()[0].read().unwrap(),
        u64::from(WRITES)
    );

    let vm = new_vm(&kvm, &mem);
    let evt = transport.queue_events()[0].try_clone().unwrap();
    vm.register_ioevent(&evt, &IoEventAddress::Mmio(notify), 0u32)
        .expect("register ioeventfd");
    let fast = run_guest(&vm, &mut transport);
    assert_eq!(fast.vmm_exits, 0, "notifications still exit to the VMM");
    assert_eq!(
        transport.queue_events()[0].read().unwrap(),
        u64::from(WRITES)
    );

    let per = |o: &Outcome| o.seconds * 1e6 / f64::from(WRITES);
    eprintln!(
        "QueueNotify: {:.1} us per write through the VMM, {:.1} us with ioeventfd ({} writes)",
        per(&plain),
        per(&fast),
        WRITES
    );
}

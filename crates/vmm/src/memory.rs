//! Guest RAM: vm-memory regions (anonymous, private mappings) registered
//! with KVM as user memory slots, one slot per region.
//!
//! Two dirty trackers exist for live migration: KVM's dirty log (pages the
//! vCPUs write; enabled per slot with [`GuestRam::set_dirty_logging`]) and
//! the vm-memory `AtomicBitmap` of each region (pages the VMM writes through
//! `GuestMemory`). [`GuestRam::take_dirty_pages`] ORs the two.

use devices::GuestMemory;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes cannot be mapped: {source}")]
    Mmap {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("registering guest memory slot {slot} with KVM: {source}")]
    SetSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("reading KVM's dirty log of slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("discarding guest memory: {0}")]
    Discard(std::io::Error),
}

/// One KVM memory slot backed by one vm-memory region.
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u32,
    guest_addr: u64,
    size: u64,
    host_addr: u64,
}

/// The guest's RAM and its KVM slots.
pub struct GuestRam {
    memory: GuestMemory,
    slots: Vec<Slot>,
    dirty_logging: bool,
}

/// Asks for transparent huge pages (as QEMU does for guest RAM): fewer TLB
/// misses for the guest, and reads of untouched RAM (a migration's first
/// pass) fault in one huge zero page per 2 MiB instead of 512 small ones.
/// Only a hint: a kernel without THP keeps small pages.
fn advise_huge_pages(slot: &Slot) {
    // SAFETY: the range is exactly one private anonymous mapping owned by
    // the GuestMemory being built; MADV_HUGEPAGE changes no contents.
    let rc = unsafe {
        libc::madvise(
            slot.host_addr as *mut libc::c_void,
            slot.size as usize,
            libc::MADV_HUGEPAGE,
        )
    };
    if rc != 0 {
        tracing::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
    }
}

impl GuestRam {
    /// Maps `size` bytes (split around the MMIO hole) and registers them.
    pub fn new(vm: &VmFd, size: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let memory = GuestMemory::from_ranges(&ranges)
            .map_err(|source| MemoryError::Mmap { size, source })?;
        let slots = memory
            .iter()
            .zip(0u32..)
            .map(|(region, index)| Slot {
                index,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            })
            .collect();
        for slot in &slots {
            advise_huge_pages(slot);
        }
        let ram = GuestRam {
            memory,
            slots,
            dirty_logging: false,
        };
        ram.register(vm)?;
        Ok(ram)
    }

    /// The memory devices and loaders read and write.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Total guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let flags = if self.dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for slot in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: slot.index,
                flags,
                guest_phys_addr: slot.guest_addr,
                memory_size: slot.size,
                userspace_addr: slot.host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `self.memory`,
            // which outlives the VM's use of it (the VM is torn down first).
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                MemoryError::SetSlot {
                    slot: slot.index,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Turns KVM dirty-page logging on or off for every slot (migration
    /// turns it on for its duration only: it slows guest writes).
    pub fn set_dirty_logging(&mut self, vm: &VmFd, enable: bool) -> Result<(), MemoryError> {
        self.dirty_logging = enable;
        self.register(vm)
    }

    /// Pages written since the last call, per slot as (guest address of the
    /// slot, bitmap of 4 KiB pages): KVM's log ORed with the VMM's own writes.
    /// Both logs are reset.
    pub fn take_dirty_pages(&self, vm: &VmFd) -> Result<Vec<(u64, Vec<u64>)>, MemoryError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (slot, region) in self.slots.iter().zip(self.memory.iter()) {
            let mut bitmap = if self.dirty_logging {
                vm.get_dirty_log(slot.index, slot.size as usize)
                    .map_err(|source| MemoryError::DirtyLog {
                        slot: slot.index,
                        source,
                    })?
            } else {
                vec![0; (slot.size / layout::PAGE_SIZE).div_ceil(64) as usize]
            };
            // The region's own bitmap (pages the VMM wrote), one bit per 4 KiB.
            let vmm_words = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (word, vmm_word) in bitmap.iter_mut().zip(vmm_words) {
                *word |= vmm_word;
            }
            out.push((slot.guest_addr, bitmap));
        }
        Ok(out)
    }

    /// Gives every page back to the host; the guest then reads zeros (a
    /// machine reset starts from clean RAM, as after power-on).
    pub fn discard_all(&self) -> Result<(), MemoryError> {
        for slot in &self.slots {
            // SAFETY: the range is exactly one private anonymous mapping owned
            // by `self.memory`; MADV_DONTNEED only replaces its contents with
            // zero pages, the mapping itself stays valid.
            let rc = unsafe {
                libc::madvise(
                    slot.host_addr as *mut libc::c_void,
                    slot.size as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(MemoryError::Discard(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

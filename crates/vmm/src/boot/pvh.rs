//! PVH boot: an ELF loaded at its physical addresses, entered in 32-bit
//! protected mode with `hvm_start_info` (xenbits.xen.org/docs/unstable/misc/pvh.html).

use std::fs::File;
use std::path::Path;

use devices::GuestMemory;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::{acpi, BootError, Initrd, KernelFormat, LoadedKernel};
use crate::layout::{self, E820Entry};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

pub(super) fn load_elf(
    mem: &GuestMemory,
    file: &mut File,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let result = Elf::load(mem, None, file, None).map_err(|e| BootError::Elf {
        path: path.to_owned(),
        message: elf_message(&e),
    })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            end: result.kernel_end,
            format: KernelFormat::Pvh { entry: entry.0 },
        }),
        _ => Err(BootError::NoPvhNote {
            path: path.to_owned(),
        }),
    }
}

fn elf_message(e: &linux_loader::loader::Error) -> String {
    use linux_loader::loader::elf::Error as E;
    match e {
        linux_loader::loader::Error::Elf(E::ReadKernelImage) => {
            "a segment lies outside guest memory or the file is truncated (give more --memory or check the file)".into()
        }
        linux_loader::loader::Error::Elf(E::InvalidElfMagicNumber) => "not a 64-bit x86 ELF executable".into(),
        other => other.to_string(),
    }
}

/// Writes `hvm_start_info`, its memory map and module list; returns its address.
pub(super) fn write_start_info(
    mem: &GuestMemory,
    e820: &[E820Entry],
    initrd: Option<Initrd>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: acpi::RSDP_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at =
            layout::PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_ADDR;
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_ADDR))?;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_ADDR))?;
    Ok(layout::PVH_INFO_ADDR)
}

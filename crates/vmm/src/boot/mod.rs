//! Loading a kernel into guest memory and describing the machine to it.
//!
//! Two entry paths: an ELF with the Xen PVH note (Linux's vmlinux with
//! CONFIG_PVH, the probe guest) starts in 32-bit protected mode with
//! `hvm_start_info`; a bzImage starts at its 64-bit entry with `boot_params`
//! (Linux 64-bit boot protocol). Both get the command line, the e820 map, an
//! optional initrd, and the ACPI tables and the MP table that list every vCPU.

mod acpi;
mod bzimage;
mod mptable;
mod pvh;
pub(crate) mod tables;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;

pub use acpi::RSDP_ADDR;

/// Errors loading the kernel and boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "kernel {path}: not an ELF file or a bzImage (no ELF magic, no \"HdrS\" at offset 0x202)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("kernel {path}: ELF file has no PVH entry note (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote { path: PathBuf },
    #[error("kernel {path}: {message}")]
    Elf { path: PathBuf, message: String },
    #[error("kernel {path}: {message}")]
    BzImage { path: PathBuf, message: String },
    #[error("initrd {path}: {size} bytes do not fit below {limit:#x} in guest memory after the kernel (ends at {kernel_end:#x})")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("initrd {path}: reading {size} bytes: {source}")]
    ReadInitrd {
        path: PathBuf,
        size: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing boot structures into guest memory: {0}")]
    Write(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh32,
    /// 64-bit long mode on identity-mapped page tables, RSI = `boot_params`.
    Linux64,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub rip: u64,
    /// `hvm_start_info` (PVH) or `boot_params` (bzImage) address.
    pub info: u64,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
}

/// A loaded kernel image: where it ends, and how it is entered.
struct LoadedKernel {
    end: u64,
    format: KernelFormat,
}

enum KernelFormat {
    Pvh { entry: u64 },
    BzImage(bzimage::Header),
}

/// Loads kernel, initrd, command line and tables; returns the entry point.
pub fn load(mem: &GuestMemory, mem_size: u64, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let mut kernel = File::open(&spec.kernel).map_err(|source| BootError::OpenKernel {
        path: spec.kernel.clone(),
        source,
    })?;
    let loaded = load_kernel(mem, &mut kernel, &spec.kernel)?;
    let low_ram_end = mem_size.min(layout::MMIO_HOLE_START);
    let initrd = match &spec.initrd {
        Some(path) => Some(load_initrd(mem, path, &loaded, low_ram_end)?),
        None => None,
    };
    tables::write_gdt(mem).map_err(write_err)?;
    acpi::write(mem, spec.vcpus).map_err(write_err)?;
    mptable::write(mem, spec.vcpus).map_err(write_err)?;
    let mut cmdline = spec.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(write_err)?;
    let e820 = layout::e820_map(mem_size);
    match loaded.format {
        KernelFormat::Pvh { entry } => {
            let info = pvh::write_start_info(mem, &e820, initrd).map_err(write_err)?;
            Ok(BootEntry {
                mode: EntryMode::Pvh32,
                rip: entry,
                info,
            })
        }
        KernelFormat::BzImage(header) => {
            tables::write_identity_page_tables(mem).map_err(write_err)?;
            let info = bzimage::write_boot_params(mem, &header, &e820, initrd, cmdline.len())
                .map_err(write_err)?;
            Ok(BootEntry {
                mode: EntryMode::Linux64,
                // The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
                rip: layout::HIMEM_START + 0x200,
                info,
            })
        }
    }
}

fn write_err(e: impl std::fmt::Display) -> BootError {
    BootError::Write(e.to_string())
}

fn load_kernel(mem: &GuestMemory, file: &mut File, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut head = [0u8; 0x210];
    let len = read_up_to(file, &mut head).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    if len >= 4 && head[..4] == *b"\x7fELF" {
        pvh::load_elf(mem, file, path)
    } else if len >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        bzimage::load(mem, file, path)
    } else {
        Err(BootError::UnknownFormat {
            path: path.to_owned(),
        })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// The initrd's guest address and size.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
}

/// Places the initrd page-aligned at the top of low RAM (below the limit
/// the kernel accepts), above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<Initrd, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: path.to_owned(),
            source,
        })?
        .len();
    let limit = match &kernel.format {
        KernelFormat::BzImage(h) => low_ram_end.min(u64::from(h.initrd_addr_max) + 1),
        KernelFormat::Pvh { .. } => low_ram_end,
    };
    let too_big = || BootError::InitrdTooBig {
        path: path.to_owned(),
        size,
        limit,
        kernel_end: kernel.end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(layout::PAGE_SIZE - 1);
    if addr < kernel.end.max(layout::HIMEM_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_owned(),
            size,
            source,
        })?;
    Ok(Initrd { addr, size })
}

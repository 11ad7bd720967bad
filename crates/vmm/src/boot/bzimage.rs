//! bzImage boot through the Linux 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the protected-mode kernel at 1 MiB,
//! entered at its 64-bit entry with `boot_params` (the "zero page").

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use devices::GuestMemory;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::{acpi, BootError, Initrd, KernelFormat, LoadedKernel};
use crate::layout::{self, E820Entry};

pub(super) type Header = setup_header;

/// Boot protocol 2.12 added `xloadflags` and with it the 64-bit entry.
const MIN_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADED_HIGH: u8 = 1 << 0;
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const KERNEL_BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID (boot.rst's type_of_loader).
const LOADER_UNDEFINED: u8 = 0xff;

pub(super) fn load(
    mem: &GuestMemory,
    file: &mut File,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let err = |message: String| BootError::BzImage {
        path: path.to_owned(),
        message,
    };
    let header = read_header(file).map_err(|e| err(format!("reading the setup header: {e}")))?;
    let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    check_header(&header, file_len).map_err(err)?;
    let needed = decompression_end(&header);
    let ram_end = mem.last_addr().0 + 1;
    if needed > ram_end.min(layout::MMIO_HOLE_START) {
        return Err(err(format!(
            "the kernel needs guest memory up to {needed:#x} to decompress itself; give more --memory"
        )));
    }
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(layout::HIMEM_START)),
        file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| err(e.to_string()))?;
    Ok(LoadedKernel {
        end: needed.max(loaded.kernel_end),
        format: KernelFormat::BzImage(loaded.setup_header.unwrap_or(header)),
    })
}

/// Where the kernel's decompressor writes up to: it runs from the load
/// address rounded up to `kernel_alignment`, but never below the address
/// the kernel was linked for (`pref_address`, LOAD_PHYSICAL_ADDR: 16 MiB
/// for x86-64 distribution kernels), and needs `init_size` bytes there.
fn decompression_end(h: &Header) -> u64 {
    let align = u64::from(h.kernel_alignment).max(1);
    let start = layout::HIMEM_START.div_ceil(align) * align;
    start.max(h.pref_address) + u64::from(h.init_size)
}

fn read_header(file: &mut File) -> std::io::Result<Header> {
    let mut header = Header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))?;
    file.read_exact(header.as_mut_slice())?;
    Ok(header)
}

/// Rejects images this loader cannot boot, naming the reason.
fn check_header(h: &Header, file_len: u64) -> Result<(), String> {
    let version = h.version;
    if version < MIN_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12, the first with a 64-bit entry point",
            version >> 8,
            version & 0xff
        ));
    }
    if h.xloadflags & XLF_KERNEL_64 == 0 {
        return Err("not a 64-bit kernel (xloadflags has no XLF_KERNEL_64)".into());
    }
    if h.loadflags & LOADED_HIGH == 0 {
        return Err("a zImage (not loaded high) is not supported".into());
    }
    let setup_sects = if h.setup_sects == 0 {
        4
    } else {
        u64::from(h.setup_sects)
    };
    let expected = (setup_sects + 1) * 512 + u64::from(h.syssize) * 16;
    if file_len < expected {
        return Err(format!(
            "truncated: the header promises {expected} bytes, the file has {file_len}"
        ));
    }
    Ok(())
}

/// Fills `boot_params` at the zero page; returns its address.
pub(super) fn write_boot_params(
    mem: &GuestMemory,
    header: &Header,
    e820: &[E820Entry],
    initrd: Option<Initrd>,
    cmdline_len: usize,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut params = boot_params {
        hdr: *header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = acpi::RSDP_ADDR;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))?;
    Ok(layout::ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Header {
        Header {
            version: 0x020f,
            xloadflags: XLF_KERNEL_64,
            loadflags: LOADED_HIGH,
            setup_sects: 3,
            syssize: 16,
            ..Default::default()
        }
    }

    #[test]
    fn decompression_runs_at_the_link_address_when_loaded_below_it() {
        // The Debian 6.1 cloud kernel's header.
        let debian = Header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x337_8000,
            ..good()
        };
        assert_eq!(decompression_end(&debian), 0x437_8000);
        let low = Header {
            kernel_alignment: 0x1000,
            pref_address: 0,
            init_size: 0x10_0000,
            ..good()
        };
        assert_eq!(decompression_end(&low), 0x20_0000);
    }

    #[test]
    fn header_checks_name_the_problem() {
        assert!(check_header(&good(), 4 * 512 + 256).is_ok());
        let old = Header {
            version: 0x0206,
            ..good()
        };
        assert!(check_header(&old, 1 << 20).unwrap_err().contains("2.06"));
        let truncated = check_header(&good(), 1000).unwrap_err();
        assert!(truncated.contains("truncated"), "{truncated}");
        let x32 = Header {
            xloadflags: 0,
            ..good()
        };
        assert!(check_header(&x32, 1 << 20).unwrap_err().contains("64-bit"));
    }
}

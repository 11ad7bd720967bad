//! Where the virtio-mmio devices are: `virtio_mmio.device=<size>@<base>:<irq>`
//! words on the kernel command line, Linux's format (what QEMU microvm
//! appends and what oxvirt's VMM passes). `<size>` takes a K or M suffix,
//! numbers are decimal or 0x hex; an optional `:<id>` after the IRQ is
//! accepted and ignored.

use core::fmt;

const PREFIX: &str = "virtio_mmio.device=";
/// The virtio-mmio register block (0x100) plus some configuration space.
const MIN_SIZE: u64 = 0x100;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, PartialEq)]
pub struct DeviceError<'a> {
    pub word: &'a str,
    pub why: &'static str,
}

impl fmt::Display for DeviceError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "bad {}: {}", self.word, self.why)
    }
}

/// Every `virtio_mmio.device=` word, in command-line order.
pub fn devices(cmdline: &str) -> impl Iterator<Item = Result<MmioDevice, DeviceError<'_>>> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| Some((word, word.strip_prefix(PREFIX)?)))
        .map(|(word, spec)| parse(spec).map_err(|why| DeviceError { word, why }))
}

fn parse(spec: &str) -> Result<MmioDevice, &'static str> {
    let (size, rest) = spec.split_once('@').ok_or("expected <size>@<base>:<irq>")?;
    let (base, irq) = rest.split_once(':').ok_or("expected <size>@<base>:<irq>")?;
    let irq = irq.split_once(':').map_or(irq, |(irq, _id)| irq);
    let size = parse_size(size).ok_or("size is not a number (K/M suffix allowed)")?;
    let base = parse_number(base).ok_or("base is not a number")?;
    let irq = parse_number(irq)
        .and_then(|irq| u32::try_from(irq).ok())
        .ok_or("irq is not a number")?;
    if size < MIN_SIZE {
        return Err("size is below the 0x100 bytes of virtio-mmio registers");
    }
    if base % 4 != 0 {
        return Err("base is not 4-byte aligned");
    }
    if base
        .checked_add(size)
        .is_none_or(|end| end > crate::bootinfo::MAPPED_LIMIT)
    {
        return Err("the region is not below 4 GiB");
    }
    Ok(MmioDevice { base, size, irq })
}

fn parse_size(text: &str) -> Option<u64> {
    let (digits, scale) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1 << 10),
        b'm' | b'M' => (&text[..text.len() - 1], 1 << 20),
        _ => (text, 1),
    };
    parse_number(digits)?.checked_mul(scale)
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_microvm_entries() {
        let cmdline = "probe=blk virtio_mmio.device=512@0xfeb00e00:12 quiet \
                       virtio_mmio.device=4K@0xfeb00c00:11:3";
        let found: Vec<_> = devices(cmdline).collect();
        assert_eq!(
            found,
            vec![
                Ok(MmioDevice {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                }),
                Ok(MmioDevice {
                    base: 0xfeb0_0c00,
                    size: 4096,
                    irq: 11
                }),
            ]
        );
        assert_eq!(devices("probe=blk console=ttyS0").count(), 0);
    }

    #[test]
    fn bad_entries_are_named() {
        for (word, why) in [
            ("virtio_mmio.device=512", "expected"),
            ("virtio_mmio.device=512@0xfeb00e00", "expected"),
            ("virtio_mmio.device=x@0xfeb00e00:1", "size"),
            ("virtio_mmio.device=512@0xzz:1", "base"),
            ("virtio_mmio.device=512@0x1000:99999999999", "irq"),
            ("virtio_mmio.device=16@0x1000:1", "below the 0x100"),
            ("virtio_mmio.device=512@0x1001:1", "aligned"),
            ("virtio_mmio.device=512@0xffffffff00:1", "4 GiB"),
            ("virtio_mmio.device=99999999999999999M@0x0:1", "size"),
            ("virtio_mmio.device=512@0xfffffffffffffff0:1", "4 GiB"),
        ] {
            let err = devices(word).next().unwrap().unwrap_err();
            assert_eq!(err.word, word);
            assert!(err.to_string().contains(why), "{word}: {err}");
        }
    }
}

//! Guest-physical memory as the probe sees it: identity mapped below 4 GiB
//! (boot.rs's page tables), the view the library's parsers read through.

use oxvirt_probe::bootinfo::MAPPED_LIMIT;
use oxvirt_probe::PhysMem;

pub struct IdentityMap;

impl PhysMem for IdentityMap {
    fn bytes(&self, paddr: u64, len: u64) -> Option<&[u8]> {
        let end = paddr.checked_add(len)?;
        if paddr == 0 || end > MAPPED_LIMIT {
            return None;
        }
        // SAFETY: [paddr, end) lies below 4 GiB, which the boot page tables
        // map for ring 3; the parsers only read it. Address 0 is refused so
        // the slice pointer is never null.
        Some(unsafe { core::slice::from_raw_parts(paddr as *const u8, len as usize) })
    }
}

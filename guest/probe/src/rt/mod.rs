//! The small runtime every workload shares: port I/O, the serial console,
//! the exit port, boot information, command-line parameters, the TSC, and
//! the failure type that ends a run with `PROBE DONE fail: <why>`.

pub mod console;
pub mod cpuid;
pub mod exception;
pub mod exit;
pub mod fail;
#[cfg(feature = "virtio")]
mod heap;
pub mod io;
pub mod lapic;
mod libc;
pub mod physmem;
pub mod tsc;
#[cfg(feature = "virtio")]
pub mod virtio;

//! Emulated devices, each behind the [`BusDevice`] trait the VMM's buses
//! dispatch to. Legacy devices sit on the port-I/O bus, virtio-mmio devices on
//! the MMIO bus; virtio devices do their I/O on threads of their own, never on
//! a vCPU thread.

mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{BusDevice, GuestMemory, Interrupt};

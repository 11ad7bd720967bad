//! Legacy PC devices on the port-I/O bus: the 8250 UART, the i8042 keyboard
//! controller (only for its reset line), the debug-exit port and the ACPI
//! sleep-control register that powers the machine off.
//!
//! Devices that end the guest's run do not act themselves: they hand a
//! [`VmRequest`] to a [`VmRequestSink`], and the VMM decides what it means.

mod debug_exit;
mod i8042;
mod power;
mod serial;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use power::{AcpiSleepControl, SLEEP_CONTROL_S5};
pub use serial::{Serial, SerialError};

/// Something the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// A reset (i8042 pulse of the reset line, triple fault).
    Reset,
    /// Power off (ACPI S5).
    PowerOff,
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
}

/// Where devices send [`VmRequest`]s; the VMM implements it.
pub trait VmRequestSink: Send + Sync {
    fn request(&self, request: VmRequest);
}

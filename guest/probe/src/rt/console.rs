//! The serial console: a polled 8250 UART at I/O port 0x3f8 (COM1), the
//! same on QEMU microvm and oxvirt. Lines from several CPUs never interleave:
//! `line` holds a spin lock while one line is written. Every register access
//! is a VM exit, so with a 16550 FIFO one "transmitter empty" poll covers 16
//! bytes instead of one.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::io::{inb, outb};

const COM1: u16 = 0x3f8;
const IER: u16 = 1;
const FCR: u16 = 2;
const IIR: u16 = 2;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const FIFO_DEPTH: u32 = 16;
const LCR: u16 = 3;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 0x20;
/// Bound on polls of a transmitter that never empties (no UART at all).
const MAX_POLLS: u32 = 100_000;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Bytes the transmitter takes once empty: 16 with a FIFO, 1 without.
static BURST: AtomicU32 = AtomicU32::new(1);
/// Bytes written since the transmitter was last seen empty.
static IN_FLIGHT: AtomicU32 = AtomicU32::new(u32::MAX);

/// 8 data bits, no parity, one stop bit, FIFOs on if the UART has them, no
/// interrupts.
pub fn init() {
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, 0x03);
    outb(COM1 + FCR, 0x07);
    if inb(COM1 + IIR) & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED {
        BURST.store(FIFO_DEPTH, Ordering::Relaxed);
    }
}

/// Callers hold `LOCK`, or are the one failing CPU (`line_unlocked`).
fn put_byte(byte: u8) {
    if IN_FLIGHT.load(Ordering::Relaxed) >= BURST.load(Ordering::Relaxed) {
        let mut polls = 0;
        while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
            polls += 1;
        }
        IN_FLIGHT.store(0, Ordering::Relaxed);
    }
    outb(COM1, byte);
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
}

/// Raw access to the UART for `fmt::Write`; `line` adds the lock.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                put_byte(b'\r');
            }
            put_byte(byte);
        }
        Ok(())
    }
}

/// Writes one line, whole, even when other CPUs print at the same time.
pub fn line(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        super::io::pause();
    }
    // The UART cannot fail; `Serial::write_str` always returns Ok.
    let _ = writeln!(Serial, "{args}");
    LOCK.store(false, Ordering::Release);
}

/// Writes one line without taking the lock: for the panic and exception
/// paths, where the lock may be held by the CPU that failed.
pub fn line_unlocked(args: fmt::Arguments) {
    let _ = writeln!(Serial, "{args}");
}

/// `say!("PROBE RESULT ...")`: one console line, formatted like `println!`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::rt::console::line(format_args!($($arg)*)) };
}

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::{BusDevice, Interrupt};

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial input: the receive FIFO is full")]
    FifoFull,
    #[error("serial input: raising the interrupt failed: {0}")]
    Interrupt(io::Error),
    #[error("serial input: {0}")]
    Io(io::Error),
}

/// Adapts our irqfd-backed [`Interrupt`] to vm-superio's trigger.
struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A 16550A-compatible UART (vm-superio's 8250 model) on eight ports, e.g.
/// COM1 at 0x3f8 with IRQ 4. Guest output goes to `out`; host input is
/// queued with [`Serial::enqueue_input`].
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// COM1, the port Linux's `console=ttyS0` and `earlyprintk=ttyS0` use.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    pub const SIZE: u16 = 8;

    pub fn new(interrupt: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(interrupt), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let room = self.uart.fifo_capacity();
        if room == 0 {
            return Err(SerialError::FifoFull);
        }
        let take = bytes.len().min(room);
        self.uart
            .enqueue_raw_bytes(&bytes[..take])
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
                vm_superio::serial::Error::IOError(e) => SerialError::Io(e),
                vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
            })
    }

    /// The UART's registers, for saving device state.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        // A host-side output error (closed pipe, full disk) must not stop the
        // guest: the byte is lost, as on a real UART with nothing attached.
        if let Err(e) = self.uart.write(reg, value) {
            tracing::debug!("serial: output error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct CountIrq(AtomicUsize);
    impl Interrupt for CountIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_guest() {
        let irq = Arc::new(CountIrq::default());
        let sink = Sink::default();
        let mut uart = Serial::new(irq.clone(), Box::new(sink.clone()));
        for b in b"hi" {
            uart.write(0, &[*b]);
        }
        assert_eq!(*sink.0.lock().unwrap(), b"hi");
        uart.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(uart.enqueue_input(b"ok").unwrap(), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut b = [0u8];
        uart.read(0, &mut b);
        assert_eq!(b[0], b'o');
    }
}

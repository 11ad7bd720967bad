use std::sync::Arc;

use super::{VmRequest, VmRequestSink};
use crate::BusDevice;

/// Command byte (port 0x64) that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Status register: output buffer full.
const STATUS_OUT_FULL: u8 = 0x01;
/// Status register: "system flag" set after a successful self-test.
const STATUS_SYSTEM: u8 = 0x04;

/// The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status and
/// command), as far as a guest without a keyboard needs it: a controller that
/// answers its self-test and ports, and reports a reset request (command 0xfe,
/// which Linux's `reboot=k` and most firmware use) to the VMM.
pub struct I8042 {
    sink: Arc<dyn VmRequestSink>,
    /// The byte the next read of the data port returns, if any.
    output: Option<u8>,
    /// A command that waits for its data byte on port 0x60.
    pending: Option<u8>,
    command_byte: u8,
}

impl I8042 {
    /// The data port; the device spans 0x60..=0x64 (0x61-0x63 read as 0xff).
    pub const PORT: u16 = 0x60;
    pub const SIZE: u16 = 5;
    const DATA: u64 = 0;
    const COMMAND: u64 = 4;

    pub fn new(sink: Arc<dyn VmRequestSink>) -> Self {
        I8042 {
            sink,
            output: None,
            pending: None,
            command_byte: 0,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => self.sink.request(VmRequest::Reset),
            0x20 => self.output = Some(self.command_byte),
            0x60 | 0xd1 => self.pending = Some(cmd),
            0xaa => self.output = Some(0x55), // controller self-test passed
            0xab => self.output = Some(0x00), // keyboard interface test passed
            _ => tracing::debug!(cmd, "i8042: ignored command"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(0x60) => self.command_byte = value,
            // Output port write: bit 0 low asserts the CPU reset line.
            Some(0xd1) if value & 1 == 0 => self.sink.request(VmRequest::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            Self::DATA => self.output.take().unwrap_or(0),
            Self::COMMAND => {
                STATUS_SYSTEM
                    | if self.output.is_some() {
                        STATUS_OUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            Self::DATA => self.data(value),
            Self::COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::debug_exit::tests::Recorder;

    #[test]
    fn reset_command_is_reported() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(I8042::COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(*rec.0.lock().unwrap(), vec![VmRequest::Reset]);
    }

    #[test]
    fn self_test_answers_and_output_port_reset() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(I8042::COMMAND, &[0xaa]);
        let mut b = [0u8];
        dev.read(I8042::COMMAND, &mut b);
        assert_eq!(b[0] & STATUS_OUT_FULL, STATUS_OUT_FULL);
        dev.read(I8042::DATA, &mut b);
        assert_eq!(b[0], 0x55);
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(I8042::COMMAND, &[0xd1]);
        dev.write(I8042::DATA, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![VmRequest::Reset]);
    }
}

use std::sync::Arc;

use super::{VmRequest, VmRequestSink};
use crate::BusDevice;

/// QEMU's `isa-debug-exit` (iobase 0xf4, iosize 4): a write of `v` ends the
/// VM and the VMM exits with status `(v << 1) | 1`, so a guest signals its
/// result the same way under oxvirt and QEMU.
pub struct DebugExit {
    sink: Arc<dyn VmRequestSink>,
}

impl DebugExit {
    /// The port QEMU's `isa-debug-exit,iobase=0xf4` uses.
    pub const PORT: u16 = 0xf4;
    /// Its size in ports.
    pub const SIZE: u16 = 4;

    pub fn new(sink: Arc<dyn VmRequestSink>) -> Self {
        DebugExit { sink }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        let len = data.len().min(4);
        value[..len].copy_from_slice(&data[..len]);
        self.sink
            .request(VmRequest::DebugExit(u32::from_le_bytes(value)));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<VmRequest>>);

    impl VmRequestSink for Recorder {
        fn request(&self, request: VmRequest) {
            self.0.lock().unwrap().push(request);
        }
    }

    #[test]
    fn byte_and_dword_writes_carry_the_value() {
        let rec = Arc::new(Recorder::default());
        let mut dev = DebugExit::new(rec.clone());
        dev.write(0, &[3]);
        dev.write(0, &0x1234_5678u32.to_le_bytes());
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![VmRequest::DebugExit(3), VmRequest::DebugExit(0x1234_5678)]
        );
    }
}

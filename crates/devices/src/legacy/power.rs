use std::sync::Arc;

use super::{VmRequest, VmRequestSink};
use crate::BusDevice;

/// The value a guest writes to enter S5 (soft off): SLP_TYP=5 with SLP_EN,
/// in the hardware-reduced ACPI sleep-control register layout.
pub const SLEEP_CONTROL_S5: u8 = (5 << 2) | (1 << 5);

/// The ACPI sleep-control register of a hardware-reduced platform (the
/// FADT's SLEEP_CONTROL_REG points here). Writing S5 with SLP_EN powers the
/// machine off; Linux does this on `poweroff` (its `_S5_` comes from our DSDT).
pub struct AcpiSleepControl {
    sink: Arc<dyn VmRequestSink>,
}

impl AcpiSleepControl {
    pub const PORT: u16 = 0x600;
    pub const SIZE: u16 = 1;

    pub fn new(sink: Arc<dyn VmRequestSink>) -> Self {
        AcpiSleepControl { sink }
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        const SLP_EN: u8 = 1 << 5;
        const SLP_TYP_MASK: u8 = 0x7 << 2;
        if let Some(&value) = data.first() {
            if value & SLP_EN != 0 && value & SLP_TYP_MASK == SLEEP_CONTROL_S5 & SLP_TYP_MASK {
                self.sink.request(VmRequest::PowerOff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::debug_exit::tests::Recorder;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let rec = Arc::new(Recorder::default());
        let mut dev = AcpiSleepControl::new(rec.clone());
        dev.write(0, &[5 << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | (1 << 5)]); // S3
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(0, &[SLEEP_CONTROL_S5]);
        assert_eq!(*rec.0.lock().unwrap(), vec![VmRequest::PowerOff]);
    }
}

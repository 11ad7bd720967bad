//! `Fail`: why a workload failed, as the text of `PROBE DONE fail: <why>`.
//! The probe has no heap, so the message is formatted into a fixed buffer
//! (long messages are cut, never lost entirely).

use core::fmt::{self, Write};

const CAPACITY: usize = 200;

pub struct Fail {
    buf: [u8; CAPACITY],
    len: usize,
}

impl Fail {
    pub fn new(args: fmt::Arguments) -> Self {
        let mut fail = Fail {
            buf: [0; CAPACITY],
            len: 0,
        };
        // Truncation is reported as fmt::Error; the prefix kept is still useful.
        let _ = fail.write_fmt(args);
        fail
    }

    pub fn as_str(&self) -> &str {
        // `write_str` only ever appends whole UTF-8 characters.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(message not UTF-8)")
    }
}

impl Write for Fail {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            let mut utf8 = [0; 4];
            let bytes = ch.encode_utf8(&mut utf8).as_bytes();
            if self.len + bytes.len() > CAPACITY {
                return Err(fmt::Error);
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

impl<E: fmt::Display> From<E> for Fail {
    fn from(err: E) -> Self {
        Fail::new(format_args!("{err}"))
    }
}

/// `fail!("...", args)`: an `Err(Fail)` formatted like `format!`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { Err($crate::rt::fail::Fail::new(format_args!($($arg)*))) };
}

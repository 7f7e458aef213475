//! Formatting into a caller's buffer without allocating: writes what fits, counts everything, so
//! a too-small buffer is reported with the size it needed.

use core::fmt;

/// Why rendering into a buffer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferTooSmall {
    /// Bytes the output needs.
    pub needed: usize,
}

impl fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "buffer too small: {} bytes needed", self.needed)
    }
}

impl core::error::Error for BufferTooSmall {}

/// A `fmt::Write` over a byte slice that never fails: bytes past the end are counted, not kept.
pub(crate) struct Sink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Sink { buf, len: 0 }
    }

    /// The bytes written, or the size needed if they did not fit.
    pub(crate) fn finish(self) -> Result<usize, BufferTooSmall> {
        if self.len <= self.buf.len() { Ok(self.len) } else { Err(BufferTooSmall { needed: self.len }) }
    }

    /// What has been written so far (all of it, if it fit).
    pub(crate) fn as_str(&self) -> &str {
        let kept = self.buf.get(..self.len.min(self.buf.len())).unwrap_or(&[]);
        core::str::from_utf8(kept).unwrap_or("")
    }
}

impl fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(s.as_bytes());
        }
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    /// The error says how many bytes the caller's buffer needed.
    #[test]
    fn a_too_small_buffer_says_what_it_needed() {
        let e = super::BufferTooSmall { needed: 1234 };
        assert_eq!(e.to_string(), "buffer too small: 1234 bytes needed");
    }
}

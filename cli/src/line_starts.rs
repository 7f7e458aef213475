//! Which line of a file a CSV record starts on.

use std::collections::VecDeque;
use std::io::{self, Read};

/// `inner`, noting where its lines start as csv reads it, to tell the line a record starts on:
/// csv's own position for a record is where the one before ended, before any blank lines and,
/// after a CRLF, before its LF.
pub struct LineStarts<R> {
    inner: R,
    /// Bytes read so far.
    offset: u64,
    /// The line being read: 1 + the LFs read so far (as csv counts).
    line: u64,
    /// Whether the last byte read was a CR or an LF (or none was read).
    after_newline: bool,
    /// (offset, line) of the first byte of each line read that is not blank, from the first one
    /// after the last record asked about: only what csv has read ahead, a buffer's worth.
    starts: VecDeque<(u64, u64)>,
}

impl<R> LineStarts<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        LineStarts { inner, offset: 0, line: 1, after_newline: true, starts: VecDeque::new() }
    }

    /// The line of the first byte at or after `offset` that is not a CR or an LF: the line of a
    /// record that csv says starts at `offset`. Forgets the lines before it.
    pub fn line_at(&mut self, offset: u64) -> Option<u64> {
        while self.starts.front().is_some_and(|&(start, _)| start < offset) {
            self.starts.pop_front();
        }
        self.starts.front().map(|&(_, line)| line)
    }
}

impl<R: Read> Read for LineStarts<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for (i, &b) in buf[..n].iter().enumerate() {
            let newline = b == b'\n' || b == b'\r';
            if self.after_newline && !newline {
                self.starts.push_back((self.offset + i as u64, self.line));
            }
            self.line += u64::from(b == b'\n');
            self.after_newline = newline;
        }
        self.offset += n as u64;
        Ok(n)
    }
}

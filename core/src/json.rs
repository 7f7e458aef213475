//! A push JSON lexer (RFC 8259): bytes in any chunking, events out, in constant memory and
//! without allocation, so a gateway reads a request body or a streamed response as it arrives.
//! Strings are checked as UTF-8 and handed out decoded; nesting is bounded by [`MAX_DEPTH`].
//! As Python's `json` (and so the ASGI middleware and most OpenAI-compatible servers), it takes
//! `NaN`, `Infinity` and `-Infinity` as numbers.
//!
//! ```
//! use sluicegate_core::json::{Event, Lexer};
//! let mut strings = 0;
//! let mut lexer = Lexer::new();
//! let mut sink = |e: Event<'_>| strings += usize::from(e == Event::StringEnd);
//! lexer.feed(br#"{"a": ["x", "y"#, &mut sink)?;
//! lexer.feed(br#""]}"#, &mut sink)?;
//! lexer.finish(&mut sink)?;
//! assert_eq!(strings, 2);
//! # Ok::<(), sluicegate_core::json::JsonError>(())
//! ```

/// The deepest nesting of objects and arrays accepted (the ASGI middleware's default too).
pub const MAX_DEPTH: u32 = 64;

/// Why bytes are not one JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonError {
    /// The byte at `offset` (counted from the first byte fed) cannot come there.
    Malformed {
        /// Where, in bytes from the start.
        offset: u64,
    },
    /// An object or array opens at `offset` deeper than [`MAX_DEPTH`].
    TooDeep {
        /// Where, in bytes from the start.
        offset: u64,
    },
    /// The input ended before its value did (or held none).
    Truncated,
}

impl core::fmt::Display for JsonError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            JsonError::Malformed { offset } => write!(f, "not JSON at byte {offset}"),
            JsonError::TooDeep { offset } => write!(f, "nested deeper than {MAX_DEPTH} at byte {offset}"),
            JsonError::Truncated => f.write_str("the JSON ends early"),
        }
    }
}

/// A number, as much of it as a limiter needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Number {
    /// An integer from 0 to `u64::MAX` (`-0` included).
    Count(u64),
    /// Any other integer: negative, or past `u64::MAX`.
    OtherInteger,
    /// A number with a fraction or an exponent, or `NaN`, `Infinity` or `-Infinity`.
    Fractional,
}

/// What the lexer saw. Keys and strings come in parts (one per run of plain bytes or escape),
/// decoded to UTF-8; a lone surrogate escape comes as its 3-byte WTF-8 form, `ED A0..BF xx`,
/// which valid UTF-8 never holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// `{`
    BeginObject,
    /// `}`
    EndObject,
    /// `[`
    BeginArray,
    /// `]`
    EndArray,
    /// Part of an object's key.
    KeyPart(&'a [u8]),
    /// The key is complete.
    KeyEnd,
    /// Part of a string value.
    StringPart(&'a [u8]),
    /// The string value is complete.
    StringEnd,
    /// A number.
    Number(Number),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

/// Receives a lexer's events.
pub trait Sink {
    /// One event, in input order.
    fn event(&mut self, event: Event<'_>);
}

impl<F: FnMut(Event<'_>)> Sink for F {
    fn event(&mut self, event: Event<'_>) {
        self(event)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Minus,
    Zero,
    Int,
    Dot,
    Fraction,
    Exponent,
    ExponentSign,
    ExponentDigits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A value must come: at the start, after `:` and after `,` in an array.
    Value,
    /// After `[`.
    ValueOrEnd,
    /// After `{`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    Colon,
    CommaOrEnd,
    /// The top-level value is complete: only whitespace may follow.
    Done,
    String {
        key: bool,
    },
    Escape {
        key: bool,
    },
    /// `\u` and `digits` hex digits of `value` so far; `high` is a high surrogate waiting for
    /// its low half.
    Unicode {
        key: bool,
        high: Option<u16>,
        digits: u8,
        value: u16,
    },
    /// After a high surrogate: a `\` may start its low half.
    LowBackslash {
        key: bool,
        high: u16,
    },
    /// After a high surrogate and `\`: a `u` starts its low half.
    LowU {
        key: bool,
        high: u16,
    },
    Number {
        phase: Phase,
        negative: bool,
        value: u64,
        overflow: bool,
    },
    Literal {
        which: Literal,
        matched: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Literal {
    True,
    False,
    Null,
    NaN,
    Infinity,
}

impl Literal {
    fn text(self) -> &'static [u8] {
        match self {
            Literal::True => b"true",
            Literal::False => b"false",
            Literal::Null => b"null",
            Literal::NaN => b"NaN",
            Literal::Infinity => b"Infinity",
        }
    }

    fn event(self) -> Event<'static> {
        match self {
            Literal::True => Event::Bool(true),
            Literal::False => Event::Bool(false),
            Literal::Null => Event::Null,
            Literal::NaN | Literal::Infinity => Event::Number(Number::Fractional),
        }
    }
}

/// An object key gathered from its [`Event::KeyPart`]s, for a sink that looks keys up: a key
/// longer than the buffer reads as empty, which names no field.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    bytes: [u8; KEY_MAX],
    len: usize,
}

/// Bytes a [`Key`] holds: more than the longest field name any scanner reads.
pub const KEY_MAX: usize = 24;

impl Key {
    /// No key yet.
    pub const fn new() -> Self {
        Key { bytes: [0; KEY_MAX], len: 0 }
    }

    /// Appends a part.
    pub fn push(&mut self, part: &[u8]) {
        let end = self.len.saturating_add(part.len());
        if let Some(dst) = self.bytes.get_mut(self.len..end) {
            dst.copy_from_slice(part);
        }
        self.len = end;
    }

    /// The key so far: empty if it outgrew the buffer.
    pub fn get(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    /// Forgets the key, for the next one.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Default for Key {
    fn default() -> Self {
        Self::new()
    }
}

/// Characters (Unicode scalar values, a lone surrogate counting one) in decoded string parts:
/// the bytes that do not continue a UTF-8 sequence.
pub fn chars(part: &[u8]) -> u64 {
    part.iter().filter(|b| **b & 0xC0 != 0x80).count() as u64
}

/// The lexer: 40-odd bytes of state, whatever the input's size.
#[derive(Clone, Debug)]
pub struct Lexer {
    state: State,
    /// Bit `i` set: the container at depth `i + 1` is an object.
    objects: u64,
    depth: u32,
    /// Continuation bytes the current UTF-8 sequence still needs, and the range of the next.
    utf8_needs: u8,
    utf8_low: u8,
    utf8_high: u8,
    consumed: u64,
    failed: Option<JsonError>,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

const fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `code` as UTF-8 (WTF-8 for a lone surrogate) in `buf`; returns the length.
fn encode(code: u32, buf: &mut [u8; 4]) -> usize {
    // Each `as u8` keeps the low bits the masks select.
    if code < 0x80 {
        buf[0] = code as u8;
        1
    } else if code < 0x800 {
        buf[0] = 0xC0 | (code >> 6) as u8;
        buf[1] = 0x80 | (code & 0x3F) as u8;
        2
    } else if code < 0x1_0000 {
        buf[0] = 0xE0 | (code >> 12) as u8;
        buf[1] = 0x80 | ((code >> 6) & 0x3F) as u8;
        buf[2] = 0x80 | (code & 0x3F) as u8;
        3
    } else {
        buf[0] = 0xF0 | (code >> 18) as u8;
        buf[1] = 0x80 | ((code >> 12) & 0x3F) as u8;
        buf[2] = 0x80 | ((code >> 6) & 0x3F) as u8;
        buf[3] = 0x80 | (code & 0x3F) as u8;
        4
    }
}

fn hex(b: u8) -> Option<u16> {
    match b {
        b'0'..=b'9' => Some(u16::from(b - b'0')),
        b'a'..=b'f' => Some(u16::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u16::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Lexer {
    /// A lexer expecting one JSON value.
    pub const fn new() -> Self {
        Lexer {
            state: State::Value,
            objects: 0,
            depth: 0,
            utf8_needs: 0,
            utf8_low: 0x80,
            utf8_high: 0xBF,
            consumed: 0,
            failed: None,
        }
    }

    /// Lexes the next bytes of the input. After an error every call returns that error.
    pub fn feed(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), JsonError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.lex(chunk, sink);
        self.consumed = self.consumed.saturating_add(chunk.len() as u64);
        result.map_err(|e| *self.failed.insert(e))
    }

    /// Ends the input: `Ok` if it held exactly one complete value.
    pub fn finish(&mut self, sink: &mut impl Sink) -> Result<(), JsonError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // A number ends where its input does; nothing else can.
        if let State::Number { .. } = self.state {
            self.end_number(sink).map_err(|e| *self.failed.insert(e))?;
        }
        match self.state {
            State::Done => Ok(()),
            _ => Err(*self.failed.insert(JsonError::Truncated)),
        }
    }

    fn after_value(&self) -> State {
        if self.depth == 0 { State::Done } else { State::CommaOrEnd }
    }

    fn in_object(&self) -> bool {
        self.depth.checked_sub(1).is_some_and(|top| (self.objects >> top) & 1 == 1)
    }

    fn open(&mut self, object: bool, offset: u64, sink: &mut impl Sink) -> Result<(), JsonError> {
        if self.depth >= MAX_DEPTH {
            return Err(JsonError::TooDeep { offset });
        }
        let bit = 1u64 << self.depth;
        self.objects = if object { self.objects | bit } else { self.objects & !bit };
        self.depth += 1;
        if object {
            sink.event(Event::BeginObject);
            self.state = State::KeyOrEnd;
        } else {
            sink.event(Event::BeginArray);
            self.state = State::ValueOrEnd;
        }
        Ok(())
    }

    fn close(&mut self, sink: &mut impl Sink) {
        let object = self.in_object();
        self.depth -= 1;
        sink.event(if object { Event::EndObject } else { Event::EndArray });
        self.state = self.after_value();
    }

    fn end_number(&mut self, sink: &mut impl Sink) -> Result<(), JsonError> {
        let State::Number { phase, negative, value, overflow } = self.state else { return Ok(()) };
        let number = match phase {
            Phase::Zero | Phase::Int if overflow || (negative && value != 0) => Number::OtherInteger,
            Phase::Zero | Phase::Int => Number::Count(value),
            Phase::Fraction | Phase::ExponentDigits => Number::Fractional,
            Phase::Minus | Phase::Dot | Phase::Exponent | Phase::ExponentSign => {
                return Err(JsonError::Truncated);
            }
        };
        sink.event(Event::Number(number));
        self.state = self.after_value();
        Ok(())
    }

    /// The escape `\u` of `code` is complete (its low half too, for a surrogate pair).
    fn unicode_done(&mut self, key: bool, code: u16, sink: &mut impl Sink) {
        if (0xD800..0xDC00).contains(&code) {
            self.state = State::LowBackslash { key, high: code };
        } else {
            self.emit_code(key, u32::from(code), sink);
            self.state = State::String { key };
        }
    }

    fn emit_code(&mut self, key: bool, code: u32, sink: &mut impl Sink) {
        let mut buf = [0u8; 4];
        let len = encode(code, &mut buf);
        let part = buf.get(..len).unwrap_or_default();
        sink.event(if key { Event::KeyPart(part) } else { Event::StringPart(part) });
    }

    fn lex(&mut self, chunk: &[u8], sink: &mut impl Sink) -> Result<(), JsonError> {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            let offset = self.consumed.saturating_add(i as u64);
            let malformed = JsonError::Malformed { offset };
            match self.state {
                State::String { key } => {
                    i = self.string_run(chunk, i, key, sink)?;
                    continue;
                }
                State::Escape { key } => {
                    let plain = match b {
                        b'"' | b'\\' | b'/' => b,
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.state = State::Unicode { key, high: None, digits: 0, value: 0 };
                            i += 1;
                            continue;
                        }
                        _ => return Err(malformed),
                    };
                    self.emit_code(key, u32::from(plain), sink);
                    self.state = State::String { key };
                }
                State::Unicode { key, high, digits, value } => {
                    let value = value * 16 + hex(b).ok_or(malformed)?;
                    if digits < 3 {
                        self.state = State::Unicode { key, high, digits: digits + 1, value };
                    } else {
                        match high {
                            Some(h) if (0xDC00..0xE000).contains(&value) => {
                                // Each half carries 10 bits of the code point past U+FFFF.
                                let code =
                                    0x1_0000 + ((u32::from(h) & 0x3FF) << 10) + (u32::from(value) & 0x3FF);
                                self.emit_code(key, code, sink);
                                self.state = State::String { key };
                            }
                            Some(h) => {
                                // Python's json keeps a lone high surrogate as one character.
                                self.emit_code(key, u32::from(h), sink);
                                self.unicode_done(key, value, sink);
                            }
                            None => self.unicode_done(key, value, sink),
                        }
                    }
                }
                State::LowBackslash { key, high } => {
                    if b == b'\\' {
                        self.state = State::LowU { key, high };
                    } else {
                        self.emit_code(key, u32::from(high), sink);
                        self.state = State::String { key };
                        continue;
                    }
                }
                State::LowU { key, high } => {
                    if b == b'u' {
                        self.state = State::Unicode { key, high: Some(high), digits: 0, value: 0 };
                    } else {
                        self.emit_code(key, u32::from(high), sink);
                        self.state = State::Escape { key };
                        continue;
                    }
                }
                State::Number { phase, negative, value, overflow } => {
                    let digit = b.is_ascii_digit();
                    let next = match (phase, b) {
                        (Phase::Minus, b'I') => {
                            self.state = State::Literal { which: Literal::Infinity, matched: 1 };
                            i += 1;
                            continue;
                        }
                        (Phase::Minus, b'0') => Phase::Zero,
                        (Phase::Minus, _) if digit => Phase::Int,
                        (Phase::Int, _) if digit => Phase::Int,
                        (Phase::Zero | Phase::Int, b'.') => Phase::Dot,
                        (Phase::Dot | Phase::Fraction, _) if digit => Phase::Fraction,
                        (Phase::Zero | Phase::Int | Phase::Fraction, b'e' | b'E') => Phase::Exponent,
                        (Phase::Exponent, b'+' | b'-') => Phase::ExponentSign,
                        (Phase::Exponent | Phase::ExponentSign | Phase::ExponentDigits, _) if digit => {
                            Phase::ExponentDigits
                        }
                        (Phase::Zero | Phase::Int | Phase::Fraction | Phase::ExponentDigits, _) => {
                            self.end_number(sink)?;
                            continue;
                        }
                        _ => return Err(malformed),
                    };
                    let (value, overflow) = if next == Phase::Int {
                        match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))) {
                            Some(v) => (v, overflow),
                            None => (value, true),
                        }
                    } else {
                        (value, overflow)
                    };
                    self.state = State::Number { phase: next, negative, value, overflow };
                }
                State::Literal { which, matched } => {
                    let text = which.text();
                    if text.get(usize::from(matched)) != Some(&b) {
                        return Err(malformed);
                    }
                    if usize::from(matched) + 1 == text.len() {
                        sink.event(which.event());
                        self.state = self.after_value();
                    } else {
                        self.state = State::Literal { which, matched: matched + 1 };
                    }
                }
                _ if is_space(b) => {}
                State::Value | State::ValueOrEnd => match b {
                    b'{' => self.open(true, offset, sink)?,
                    b'[' => self.open(false, offset, sink)?,
                    b'"' => self.state = State::String { key: false },
                    b'-' => {
                        self.state =
                            State::Number { phase: Phase::Minus, negative: true, value: 0, overflow: false }
                    }
                    b'0' => {
                        self.state =
                            State::Number { phase: Phase::Zero, negative: false, value: 0, overflow: false }
                    }
                    b'1'..=b'9' => {
                        let value = u64::from(b - b'0');
                        self.state =
                            State::Number { phase: Phase::Int, negative: false, value, overflow: false };
                    }
                    b't' => self.state = State::Literal { which: Literal::True, matched: 1 },
                    b'f' => self.state = State::Literal { which: Literal::False, matched: 1 },
                    b'n' => self.state = State::Literal { which: Literal::Null, matched: 1 },
                    b'N' => self.state = State::Literal { which: Literal::NaN, matched: 1 },
                    b'I' => self.state = State::Literal { which: Literal::Infinity, matched: 1 },
                    b']' if self.state == State::ValueOrEnd => self.close(sink),
                    _ => return Err(malformed),
                },
                State::KeyOrEnd | State::Key => match b {
                    b'"' => self.state = State::String { key: true },
                    b'}' if self.state == State::KeyOrEnd => self.close(sink),
                    _ => return Err(malformed),
                },
                State::Colon => match b {
                    b':' => self.state = State::Value,
                    _ => return Err(malformed),
                },
                State::CommaOrEnd => match (b, self.in_object()) {
                    (b',', true) => self.state = State::Key,
                    (b',', false) => self.state = State::Value,
                    (b'}', true) | (b']', false) => self.close(sink),
                    _ => return Err(malformed),
                },
                State::Done => return Err(malformed),
            }
            i += 1;
        }
        Ok(())
    }

    /// Lexes a string's plain bytes from `start`, handing them out as one part, and the `"` or
    /// `\` that ends the run. Returns where to go on.
    fn string_run(
        &mut self,
        chunk: &[u8],
        start: usize,
        key: bool,
        sink: &mut impl Sink,
    ) -> Result<usize, JsonError> {
        let mut i = start;
        let mut end = None;
        while let Some(&b) = chunk.get(i) {
            if self.utf8_needs > 0 {
                if b < self.utf8_low || b > self.utf8_high {
                    return Err(JsonError::Malformed { offset: self.consumed.saturating_add(i as u64) });
                }
                self.utf8_needs -= 1;
                (self.utf8_low, self.utf8_high) = (0x80, 0xBF);
                i += 1;
                continue;
            }
            // Lead bytes and the range of the byte after them (RFC 3629: no overlong forms,
            // no surrogates, nothing past U+10FFFF).
            let (needs, low, high) = match b {
                b'"' | b'\\' => {
                    end = Some(b);
                    break;
                }
                0x20..=0x7F => (0, 0x80, 0xBF),
                0xC2..=0xDF => (1, 0x80, 0xBF),
                0xE0 => (2, 0xA0, 0xBF),
                0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
                0xED => (2, 0x80, 0x9F),
                0xF0 => (3, 0x90, 0xBF),
                0xF1..=0xF3 => (3, 0x80, 0xBF),
                0xF4 => (3, 0x80, 0x8F),
                _ => return Err(JsonError::Malformed { offset: self.consumed.saturating_add(i as u64) }),
            };
            (self.utf8_needs, self.utf8_low, self.utf8_high) = (needs, low, high);
            i += 1;
        }
        if let Some(part) = chunk.get(start..i).filter(|p| !p.is_empty()) {
            sink.event(if key { Event::KeyPart(part) } else { Event::StringPart(part) });
        }
        match end {
            Some(b'"') => {
                if key {
                    sink.event(Event::KeyEnd);
                    self.state = State::Colon;
                } else {
                    sink.event(Event::StringEnd);
                    self.state = self.after_value();
                }
                Ok(i + 1)
            }
            Some(_) => {
                self.state = State::Escape { key };
                Ok(i + 1)
            }
            None => Ok(i),
        }
    }
}

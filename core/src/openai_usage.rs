//! What an OpenAI-compatible response (Chat Completions or Completions) reports it used, read
//! as its bytes pass — a JSON body, or a stream of server-sent events whose last chunk carries
//! `usage` (`stream_options.include_usage`) — in constant memory, whatever the chunking, by
//! the rules of the ASGI middleware (`python/python/sluicegate/asgi.py`):
//!
//! - `usage` is `prompt_tokens` (optional), `completion_tokens` and
//!   `prompt_tokens_details.cached_tokens` (0 when absent), each an integer from 0 to 2^32;
//!   the last usable `usage` wins, and an unusable one is flagged, never used;
//! - the generated text, for a response without usable usage and for charging a stream as it
//!   goes, is the characters of each choice's `text` and of its `delta` (a stream) or `message`
//!   (a body): `content`, `reasoning_content`, `reasoning`, `refusal` and tool calls'
//!   `function.arguments`; a text may be a string or a list of strings and `{"text": ...}` parts.
//!
//! In a stream each line is read on its own: `data: {...}` lines are events, `[DONE]`, comments,
//! other fields and lines that are not JSON objects are skipped.
//!
//! ```
//! use sluicegate_core::openai_usage::UsageScanner;
//! let mut scanner = UsageScanner::new(true);
//! scanner.feed(b"data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}]}\n\nda");
//! assert_eq!(scanner.generated_chars(), 3);
//! scanner.feed(b"ta: {\"choices\": [], \"usage\": {\"prompt_tokens\": 9, \"completion_tokens\": 1}}\n\ndata: [DONE]\n\n");
//! let read = scanner.finish();
//! let usage = read.usage.unwrap();
//! assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens), (Some(9), 1, 0));
//! ```

use crate::json::{Event, Key, Lexer, MAX_DEPTH, Number, Sink, chars};
use crate::openai_request::MAX_COUNT;

/// A response's `usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportedUsage {
    /// `prompt_tokens`, if the response gave it.
    pub prompt_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens`: prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// `completion_tokens`.
    pub completion_tokens: u64,
}

/// What a whole response reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseUsage {
    /// The last usable `usage`.
    pub usage: Option<ReportedUsage>,
    /// Some `usage` was there but unusable (a count that is not an integer from 0 to 2^32, a
    /// missing `completion_tokens`, or not an object).
    pub malformed_usage: bool,
    /// Characters of generated text (see the module's rules).
    pub generated_chars: u64,
    /// JSON objects read: the body, or the stream's events.
    pub objects: u64,
}

/// The scanner: feed it the response's bytes as they come, then finish.
#[derive(Clone, Debug)]
pub struct UsageScanner {
    stream: bool,
    /// `finish` was called: what the response reported is final.
    finished: bool,
    line: Line,
    lexer: Lexer,
    object: Object,
    read: ResponseUsage,
}

/// Where a stream's line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Before the line's first non-blank byte.
    Start,
    /// `matched` bytes of `data:`.
    Prefix { matched: u8 },
    /// After `data:`, before the data's first non-blank byte.
    Blank,
    /// In the data, which goes to the lexer.
    Data,
    /// A line that is no event, or whose event failed: up to its end.
    Skip,
}

const DATA: &[u8] = b"data:";

/// Where the line at `from` ends in `bytes`: at its `\n`, or at the end of the chunk.
fn line_end(bytes: &[u8], from: usize) -> usize {
    bytes.get(from..).and_then(|rest| rest.iter().position(|&b| b == b'\n')).map_or(bytes.len(), |p| from + p)
}

/// Python's `bytes.strip()` whitespace.
const fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | 0x0B | 0x0C)
}

impl UsageScanner {
    /// A scanner for a stream of server-sent events (`stream`) or for a JSON body.
    pub fn new(stream: bool) -> Self {
        UsageScanner {
            stream,
            finished: false,
            line: Line::Start,
            lexer: Lexer::new(),
            object: Object::new(stream),
            read: ResponseUsage::default(),
        }
    }

    /// Reads the next bytes of the response; after `finish`, none.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.finished {
            return;
        }
        if !self.stream {
            // A body that is not JSON reports nothing; the lexer remembers its error.
            self.lexer.feed(chunk, &mut self.object).ok();
            return;
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let (taken, ended) = self.line_bytes(rest);
            if ended {
                self.end_line();
            }
            rest = rest.get(taken..).unwrap_or_default();
        }
    }

    /// Generated characters read so far (in a stream, those of complete events).
    pub fn generated_chars(&self) -> u64 {
        self.read.generated_chars
    }

    /// The last usable usage read so far.
    pub fn usage(&self) -> Option<ReportedUsage> {
        self.read.usage
    }

    /// Ends the response (a stream's unterminated last line counts) and says what it reported;
    /// later calls say the same.
    pub fn finish(&mut self) -> ResponseUsage {
        if core::mem::replace(&mut self.finished, true) {
            return self.read;
        }
        if self.stream {
            self.end_line();
        } else {
            self.end_object();
        }
        self.read
    }

    /// Takes bytes of the current line from `bytes`: how many, and whether the line ended.
    fn line_bytes(&mut self, bytes: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            if b == b'\n' {
                return (i + 1, true);
            }
            match self.line {
                Line::Start if is_blank(b) => {}
                Line::Start | Line::Prefix { .. } => {
                    let matched = match self.line {
                        Line::Prefix { matched } => matched,
                        _ => 0,
                    };
                    self.line = if DATA.get(usize::from(matched)) != Some(&b) {
                        Line::Skip
                    } else if usize::from(matched) + 1 == DATA.len() {
                        Line::Blank
                    } else {
                        Line::Prefix { matched: matched + 1 }
                    };
                }
                Line::Blank if is_blank(b) => {}
                Line::Blank | Line::Data => {
                    self.line = Line::Data;
                    // The data runs to the line's end, or the chunk's.
                    let end = line_end(bytes, i);
                    let data = bytes.get(i..end).unwrap_or_default();
                    if self.lexer.feed(data, &mut self.object).is_err() {
                        self.line = Line::Skip;
                    }
                    i = end;
                    continue;
                }
                Line::Skip => {
                    // On to the line's end, which the loop's top takes, or the chunk's.
                    i = line_end(bytes, i);
                    continue;
                }
            }
            i += 1;
        }
        (bytes.len(), false)
    }

    fn end_line(&mut self) {
        if self.line == Line::Data {
            self.end_object();
        }
        self.line = Line::Start;
        self.lexer = Lexer::new();
        self.object = Object::new(self.stream);
    }

    /// The current JSON value is complete: if it was an object, what it reported counts.
    fn end_object(&mut self) {
        if self.lexer.finish(&mut self.object).is_err() || !self.object.was_object {
            return;
        }
        let o = &self.object;
        let read = &mut self.read;
        read.objects += 1;
        read.generated_chars = read.generated_chars.saturating_add(o.top_chars);
        match o.usage() {
            Ok(Some(usage)) => read.usage = Some(usage),
            Ok(None) => {}
            Err(()) => read.malformed_usage = true,
        }
    }
}

/// What a value means where it sits, for the generated text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The response object.
    Top,
    /// `choices`, if an array.
    Choices,
    /// One choice, if an object.
    Choice,
    /// A choice's `delta` or `message`, if an object.
    Part,
    /// `tool_calls`, if an array.
    Calls,
    /// One tool call, if an object.
    Call,
    /// A tool call's `function`, if an object.
    Function,
    /// A text: a string, or a list of strings and `{"text": ...}` parts.
    Text,
    /// An item of a text's list.
    TextItem,
    /// A part's `text`: a string only.
    PartText,
    /// `usage`, if an object.
    Usage,
    /// `usage.prompt_tokens_details`, if an object.
    Details,
    /// One of the usage counts.
    Count(Tally),
    /// Nothing the scanner reads.
    Ignored,
}

const PART_TEXTS: [&[u8]; 4] = [b"content", b"reasoning_content", b"reasoning", b"refusal"];

/// The usage counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tally {
    Prompt,
    Completion,
    Cached,
}

/// The last value of each usage count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    prompt: Count,
    completion: Count,
    cached: Count,
}

const NO_COUNTS: Counts = Counts { prompt: Count::Absent, completion: Count::Absent, cached: Count::Absent };

/// A usage count's last value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    Absent,
    Given(u64),
    Invalid,
}

/// An open container: its role, whether an object, the role its current key gives a value,
/// and the characters of its fields (an object, the last of duplicate keys counting) or items.
#[derive(Clone, Copy, Debug)]
struct Frame {
    role: Role,
    object: bool,
    child: Role,
    slot: u8,
    slots: [u64; 5],
    items: u64,
}

const EMPTY_FRAME: Frame =
    Frame { role: Role::Ignored, object: false, child: Role::Ignored, slot: 0, slots: [0; 5], items: 0 };

/// The lexer's sink for one JSON value (the body, or one event).
#[derive(Clone, Debug)]
struct Object {
    /// The key of a choice that holds its text: `delta` in a stream, `message` in a body.
    part_key: &'static [u8],
    depth: usize,
    frames: [Frame; MAX_DEPTH as usize],
    key: Key,
    chars: u64,
    was_object: bool,
    /// The last `usage`: `None` while absent or null, `Some(true)` an object, `Some(false)`
    /// anything else.
    usage: Option<bool>,
    /// The last `prompt_tokens_details`, likewise.
    details: Option<bool>,
    counts: Counts,
    top_chars: u64,
}

impl Object {
    fn new(stream: bool) -> Self {
        Object {
            part_key: if stream { b"delta" } else { b"message" },
            depth: 0,
            frames: [EMPTY_FRAME; MAX_DEPTH as usize],
            key: Key::new(),
            chars: 0,
            was_object: false,
            usage: None,
            details: None,
            counts: NO_COUNTS,
            top_chars: 0,
        }
    }

    fn usage(&self) -> Result<Option<ReportedUsage>, ()> {
        match self.usage {
            None => return Ok(None),
            Some(false) => return Err(()),
            Some(true) => {}
        }
        let cached = match (self.details, self.counts.cached) {
            (None, _) | (Some(true), Count::Absent) => 0,
            (Some(true), Count::Given(v)) => v,
            (Some(false), _) | (Some(true), Count::Invalid) => return Err(()),
        };
        let prompt_tokens = match self.counts.prompt {
            Count::Absent => None,
            Count::Given(v) => Some(v),
            Count::Invalid => return Err(()),
        };
        let Count::Given(completion_tokens) = self.counts.completion else { return Err(()) };
        Ok(Some(ReportedUsage { prompt_tokens, cached_tokens: cached, completion_tokens }))
    }

    /// The role, and the field slot, a value takes under the current key of an object in `role`.
    fn field(&self, role: Role) -> (Role, u8) {
        let key = self.key.get();
        match role {
            Role::Top if key == b"choices" => (Role::Choices, 0),
            Role::Top if key == b"usage" => (Role::Usage, 1),
            Role::Choice if key == b"text" => (Role::Text, 0),
            Role::Choice if key == self.part_key => (Role::Part, 1),
            Role::Part if key == b"tool_calls" => (Role::Calls, 4),
            Role::Part => match PART_TEXTS.iter().position(|t| *t == key) {
                Some(i) => (Role::Text, i as u8),
                None => (Role::Ignored, 0),
            },
            Role::Call if key == b"function" => (Role::Function, 0),
            Role::Function if key == b"arguments" => (Role::Text, 0),
            Role::TextItem if key == b"text" => (Role::PartText, 0),
            Role::Usage if key == b"prompt_tokens" => (Role::Count(Tally::Prompt), 0),
            Role::Usage if key == b"completion_tokens" => (Role::Count(Tally::Completion), 1),
            Role::Usage if key == b"prompt_tokens_details" => (Role::Details, 2),
            Role::Details if key == b"cached_tokens" => (Role::Count(Tally::Cached), 0),
            _ => (Role::Ignored, 0),
        }
    }

    /// The role a value takes where it sits now.
    fn role_here(&self) -> Role {
        let Some(frame) = self.depth.checked_sub(1).and_then(|d| self.frames.get(d)) else {
            return Role::Top;
        };
        match (frame.role, frame.object) {
            (_, true) => frame.child,
            (Role::Choices, false) => Role::Choice,
            (Role::Calls, false) => Role::Call,
            (Role::Text, false) => Role::TextItem,
            _ => Role::Ignored,
        }
    }

    /// A value is complete with `chars` of text; `kind` says what it was, for usage.
    fn value(&mut self, role: Role, chars: u64, kind: Kind) {
        match role {
            Role::Usage => self.usage = if kind == Kind::Null { None } else { Some(kind == Kind::Object) },
            Role::Details => {
                self.details = if kind == Kind::Null { None } else { Some(kind == Kind::Object) }
            }
            Role::Count(i) => {
                let count = match kind {
                    Kind::Null => Count::Absent,
                    Kind::Count(v) if v <= MAX_COUNT => Count::Given(v),
                    _ => Count::Invalid,
                };
                match i {
                    Tally::Prompt => self.counts.prompt = count,
                    Tally::Completion => self.counts.completion = count,
                    Tally::Cached => self.counts.cached = count,
                }
            }
            _ => {}
        }
        let Some(frame) = self.depth.checked_sub(1).and_then(|d| self.frames.get_mut(d)) else {
            self.was_object = kind == Kind::Object;
            self.top_chars = chars;
            return;
        };
        if frame.object {
            // Keys the scanner does not read have no slot.
            if let Some(s) = frame.slots.get_mut(usize::from(frame.slot)).filter(|_| role != Role::Ignored) {
                *s = chars;
            }
        } else {
            frame.items = frame.items.saturating_add(chars);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Object,
    Null,
    Count(u64),
    Other,
}

impl Sink for Object {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::BeginObject | Event::BeginArray => {
                let object = event == Event::BeginObject;
                let role = self.role_here();
                // A later `usage` (or its details) is read on its own, as Python's last key wins.
                match role {
                    Role::Usage => (self.counts, self.details) = (NO_COUNTS, None),
                    Role::Details => self.counts.cached = Count::Absent,
                    _ => {}
                }
                if let Some(frame) = self.frames.get_mut(self.depth) {
                    *frame = Frame { role, object, ..EMPTY_FRAME };
                }
                self.depth += 1;
            }
            Event::EndObject | Event::EndArray => {
                let Some(frame) = self.depth.checked_sub(1).and_then(|d| self.frames.get(d)).copied() else {
                    return;
                };
                self.depth -= 1;
                // A container counts only where its role wants one of its kind.
                let wanted = match frame.role {
                    Role::Top | Role::Choice | Role::Part | Role::Call | Role::Function | Role::TextItem => {
                        frame.object
                    }
                    Role::Choices | Role::Calls | Role::Text => !frame.object,
                    _ => false,
                };
                let chars = match (wanted, frame.object) {
                    (false, _) => 0,
                    (true, true) => frame.slots.iter().fold(0u64, |a, s| a.saturating_add(*s)),
                    (true, false) => frame.items,
                };
                self.value(frame.role, chars, if frame.object { Kind::Object } else { Kind::Other });
            }
            Event::KeyPart(part) => {
                self.key.push(part);
            }
            Event::KeyEnd => {
                if let Some(d) = self.depth.checked_sub(1) {
                    let role = self.frames.get(d).map_or(Role::Ignored, |f| f.role);
                    let (child, slot) = self.field(role);
                    if let Some(frame) = self.frames.get_mut(d) {
                        (frame.child, frame.slot) = (child, slot);
                    }
                }
                self.key.clear();
            }
            Event::StringPart(part) => {
                self.chars = self.chars.saturating_add(chars(part));
            }
            Event::StringEnd => {
                let chars = core::mem::take(&mut self.chars);
                let role = self.role_here();
                let counted = matches!(role, Role::Text | Role::TextItem | Role::PartText);
                self.value(role, if counted { chars } else { 0 }, Kind::Other);
            }
            Event::Number(n) => {
                let kind = match n {
                    Number::Count(v) => Kind::Count(v),
                    _ => Kind::Other,
                };
                self.value(self.role_here(), 0, kind);
            }
            Event::Bool(_) => self.value(self.role_here(), 0, Kind::Other),
            Event::Null => self.value(self.role_here(), 0, Kind::Null),
        }
    }
}

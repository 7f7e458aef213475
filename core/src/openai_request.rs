//! What an OpenAI-compatible request body (Chat Completions or Completions) asks for: the model,
//! `max_completion_tokens` or `max_tokens`, `n`, `stream`, `stream_options.include_usage`,
//! `service_tier`, and the prompt's size. One pass, no allocation, and the rules of the ASGI middleware
//! (`python/python/sluicegate/asgi.py`), so every gateway reserves the same for the same body:
//!
//! - a later duplicate key wins, as in Python's `json`;
//! - counts are integers from 1 to 2^32; `null` is as absent;
//! - `service_tier` is `flex`, `default` or `priority`; any other value is as absent;
//! - the prompt is the characters (Unicode scalar values, a lone surrogate escape counting one)
//!   of the strings in `messages`, `prompt`, `input`, `instructions` and `system` — through
//!   arrays, and through objects' `text`, `content`, `output` and `arguments` — plus one token per
//!   integer there (a pre-tokenized prompt).
//!
//! ```
//! use sluicegate_core::openai_request::scan;
//! let body = br#"{"model": "llama-v3p1-8b", "max_tokens": 200, "stream": true,
//!     "messages": [{"role": "user", "content": "How far is the moon?"}]}"#;
//! let fields = scan(body)?;
//! assert_eq!(fields.model(), b"llama-v3p1-8b");
//! assert_eq!((fields.max_tokens, fields.n, fields.stream), (Some(200), 1, true));
//! assert_eq!(fields.prompt_tokens(), 20 / 4);
//! # Ok::<(), sluicegate_core::openai_request::ScanError>(())
//! ```

use crate::json::{Event, JsonError, Key, Lexer, MAX_DEPTH, Number, Sink, chars};
use crate::key::MODEL_KEY_MAX;
use crate::service_tier::ServiceTier;

/// The largest count a body may give (`max_tokens`, `n`).
pub const MAX_COUNT: u64 = 1 << 32;

/// Why a body cannot be admitted as it stands; each is a 400 to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// Not one JSON value, or nested deeper than [`MAX_DEPTH`].
    Json(JsonError),
    /// JSON, but not an object.
    NotAnObject,
    /// No `model`, or one that is not a non-empty string.
    MissingModel,
    /// A model longer than [`MODEL_KEY_MAX`] bytes, or one that is not Unicode (a lone
    /// surrogate escape).
    InvalidModel,
    /// `max_completion_tokens` (or, without it, `max_tokens`) is not an integer from 1 to 2^32.
    InvalidMaxTokens,
    /// `n` is not an integer from 1 to 2^32.
    InvalidN,
}

impl From<JsonError> for ScanError {
    fn from(e: JsonError) -> Self {
        ScanError::Json(e)
    }
}

impl core::fmt::Display for ScanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ScanError::Json(e) => write!(f, "the body is not JSON: {e}"),
            ScanError::NotAnObject | ScanError::MissingModel => {
                f.write_str("the body must be JSON with a model")
            }
            ScanError::InvalidModel => write!(f, "the model must be 1 to {MODEL_KEY_MAX} bytes of UTF-8"),
            ScanError::InvalidMaxTokens => f.write_str("max_tokens must be a positive integer"),
            ScanError::InvalidN => f.write_str("n must be a positive integer"),
        }
    }
}

/// What a body asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestFields {
    model: [u8; MODEL_KEY_MAX],
    model_len: usize,
    /// `max_completion_tokens`, or else `max_tokens`; `None` when the body gives neither, and the
    /// gateway reserves its own default.
    pub max_tokens: Option<u64>,
    /// Completions asked for (`n`, 1 by default).
    pub n: u64,
    /// `"stream": true`.
    pub stream: bool,
    /// `"stream_options": {"include_usage": true}`: the stream ends with a usage chunk.
    pub include_usage: bool,
    /// Characters of the prompt's text.
    pub prompt_chars: u64,
    /// Integers in the prompt: token ids of a pre-tokenized prompt.
    pub prompt_token_ids: u64,
    /// The `service_tier` asked for; the account's grant caps it ([`ServiceTier::within`]).
    pub service_tier: Option<ServiceTier>,
}

impl RequestFields {
    /// The model, as UTF-8 bytes (escapes decoded).
    pub fn model(&self) -> &[u8] {
        self.model.get(..self.model_len).unwrap_or_default()
    }

    /// The prompt's tokens, estimated as the ASGI middleware does: a quarter of its
    /// characters plus its token ids, from 1 to [`MAX_COUNT`].
    pub fn prompt_tokens(&self) -> u64 {
        (self.prompt_chars / 4).saturating_add(self.prompt_token_ids).clamp(1, MAX_COUNT)
    }
}

/// Reads a whole request body.
pub fn scan(body: &[u8]) -> Result<RequestFields, ScanError> {
    let mut scan = Scan::new();
    let mut lexer = Lexer::new();
    lexer.feed(body, &mut scan)?;
    lexer.finish(&mut scan)?;
    scan.fields()
}

/// The prompt's size so far: characters and token ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Size {
    chars: u64,
    ids: u64,
}

impl Size {
    fn plus(self, other: Size) -> Size {
        Size { chars: self.chars.saturating_add(other.chars), ids: self.ids.saturating_add(other.ids) }
    }
}

/// What an object's current key means where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Model,
    MaxTokens,
    MaxCompletionTokens,
    N,
    Stream,
    StreamOptions,
    ServiceTier,
    /// One of the top level's prompt fields.
    Prompt(usize),
    /// One of an item's or content block's text fields.
    Text(usize),
    IncludeUsage,
    Other,
}

const PROMPT_FIELDS: [&[u8]; 5] = [b"messages", b"prompt", b"input", b"instructions", b"system"];
const TEXT_FIELDS: [&[u8]; 4] = [b"text", b"content", b"output", b"arguments"];

/// A count field's last value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    Absent,
    Given(u64),
    Invalid,
}

impl Count {
    fn of(value: Value) -> Count {
        match value {
            Value::Null => Count::Absent,
            Value::Number(Number::Count(v)) if (1..=MAX_COUNT).contains(&v) => Count::Given(v),
            _ => Count::Invalid,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    String,
    Number(Number),
    Bool(bool),
    Null,
    Object,
    Array,
}

/// An open container: the sizes of its items (an array) or of its prompt or text fields (an
/// object, where the last of duplicate keys counts).
#[derive(Clone, Copy, Debug)]
struct Frame {
    object: bool,
    key: Field,
    items: Size,
    fields: [Size; 5],
}

const EMPTY_FRAME: Frame = Frame {
    object: false,
    key: Field::Other,
    items: Size { chars: 0, ids: 0 },
    fields: [Size { chars: 0, ids: 0 }; 5],
};

/// The lexer's sink: follows where each value sits and keeps what the fields need.
struct Scan {
    depth: usize,
    frames: [Frame; MAX_DEPTH as usize],
    key: Key,
    chars: u64,
    top: Option<Value>,
    model: [u8; MODEL_KEY_MAX],
    model_len: usize,
    model_too_long: bool,
    model_given: Option<Value>,
    max_tokens: Count,
    max_completion_tokens: Count,
    n: Count,
    stream: bool,
    include_usage: bool,
    tier_name: [u8; TIER_NAME_MAX],
    tier_name_len: Option<usize>,
    service_tier: Option<ServiceTier>,
}

/// The longest service tier's name (`priority`); a longer string names none.
const TIER_NAME_MAX: usize = 8;

impl Scan {
    fn new() -> Self {
        Scan {
            depth: 0,
            frames: [EMPTY_FRAME; MAX_DEPTH as usize],
            key: Key::new(),
            chars: 0,
            top: None,
            model: [0; MODEL_KEY_MAX],
            model_len: 0,
            model_too_long: false,
            model_given: None,
            max_tokens: Count::Absent,
            max_completion_tokens: Count::Absent,
            n: Count::Absent,
            stream: false,
            include_usage: false,
            tier_name: [0; TIER_NAME_MAX],
            tier_name_len: Some(0),
            service_tier: None,
        }
    }

    /// The innermost open container's key, if it is an object at `depth`.
    fn key_at(&self, depth: usize) -> Option<Field> {
        let frame = self.frames.get(depth.checked_sub(1)?)?;
        (self.depth == depth && frame.object).then_some(frame.key)
    }

    fn classify(&self) -> Field {
        let key = self.key.get();
        if self.depth == 1 {
            if let Some(i) = PROMPT_FIELDS.iter().position(|f| *f == key) {
                return Field::Prompt(i);
            }
            return match key {
                b"model" => Field::Model,
                b"max_tokens" => Field::MaxTokens,
                b"max_completion_tokens" => Field::MaxCompletionTokens,
                b"n" => Field::N,
                b"stream" => Field::Stream,
                b"stream_options" => Field::StreamOptions,
                b"service_tier" => Field::ServiceTier,
                _ => Field::Other,
            };
        }
        match TEXT_FIELDS.iter().position(|f| *f == key) {
            Some(i) => Field::Text(i),
            None if key == b"include_usage" => Field::IncludeUsage,
            None => Field::Other,
        }
    }

    /// A value is complete, in the container now innermost (or at the top).
    fn value(&mut self, value: Value, size: Size) {
        if self.depth == 0 {
            self.top = Some(value);
            return;
        }
        let in_options =
            self.depth == 2 && self.frames.first().is_some_and(|f| f.key == Field::StreamOptions);
        let Some(frame) = self.frames.get_mut(self.depth - 1) else { return };
        if !frame.object {
            frame.items = frame.items.plus(size);
            return;
        }
        match frame.key {
            Field::Prompt(i) | Field::Text(i) => {
                if let Some(f) = frame.fields.get_mut(i) {
                    *f = size;
                }
            }
            Field::Model => self.model_given = Some(value),
            Field::MaxTokens => self.max_tokens = Count::of(value),
            Field::MaxCompletionTokens => self.max_completion_tokens = Count::of(value),
            Field::N => self.n = Count::of(value),
            Field::Stream => self.stream = value == Value::Bool(true),
            Field::StreamOptions if value != Value::Object => self.include_usage = false,
            Field::IncludeUsage if in_options => self.include_usage = value == Value::Bool(true),
            Field::ServiceTier => {
                let name = self.tier_name_len.and_then(|len| self.tier_name.get(..len));
                self.service_tier = name.filter(|_| value == Value::String).and_then(ServiceTier::from_name);
            }
            Field::StreamOptions | Field::IncludeUsage | Field::Other => {}
        }
    }

    fn begin(&mut self, object: bool) {
        if self.key_at(1) == Some(Field::StreamOptions) && object {
            self.include_usage = false;
        }
        if let Some(frame) = self.frames.get_mut(self.depth) {
            *frame = Frame { object, ..EMPTY_FRAME };
        }
        self.depth += 1;
    }

    fn end(&mut self) {
        let Some(frame) = self.depth.checked_sub(1).and_then(|d| self.frames.get(d)).copied() else { return };
        self.depth -= 1;
        let size = if frame.object {
            frame.fields.iter().fold(Size::default(), |a, f| a.plus(*f))
        } else {
            frame.items
        };
        self.value(if frame.object { Value::Object } else { Value::Array }, size);
    }

    fn fields(&self) -> Result<RequestFields, ScanError> {
        if self.top != Some(Value::Object) {
            return Err(ScanError::NotAnObject);
        }
        if self.model_given != Some(Value::String) || self.model_len == 0 && !self.model_too_long {
            return Err(ScanError::MissingModel);
        }
        let model = self.model.get(..self.model_len).unwrap_or_default();
        let lone_surrogate = model.windows(2).any(|w| w.first() == Some(&0xED) && w.get(1) >= Some(&0xA0));
        if self.model_too_long || lone_surrogate {
            return Err(ScanError::InvalidModel);
        }
        let max_tokens = match self.max_completion_tokens {
            Count::Absent => self.max_tokens,
            given => given,
        };
        let max_tokens = match max_tokens {
            Count::Absent => None,
            Count::Given(v) => Some(v),
            Count::Invalid => return Err(ScanError::InvalidMaxTokens),
        };
        let n = match self.n {
            Count::Absent => 1,
            Count::Given(v) => v,
            Count::Invalid => return Err(ScanError::InvalidN),
        };
        let prompt = self
            .frames
            .first()
            .map_or(Size::default(), |f| f.fields.iter().fold(Size::default(), |a, f| a.plus(*f)));
        Ok(RequestFields {
            model: self.model,
            model_len: self.model_len,
            max_tokens,
            n,
            stream: self.stream,
            include_usage: self.include_usage,
            prompt_chars: prompt.chars,
            prompt_token_ids: prompt.ids,
            service_tier: self.service_tier,
        })
    }
}

impl Sink for Scan {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::BeginObject => self.begin(true),
            Event::BeginArray => self.begin(false),
            Event::EndObject | Event::EndArray => self.end(),
            Event::KeyPart(part) => {
                self.key.push(part);
            }
            Event::KeyEnd => {
                let field = self.classify();
                match field {
                    Field::Model => (self.model_len, self.model_too_long) = (0, false),
                    Field::ServiceTier => self.tier_name_len = Some(0),
                    _ => {}
                }
                if let Some(frame) = self.depth.checked_sub(1).and_then(|d| self.frames.get_mut(d)) {
                    frame.key = field;
                }
                self.key.clear();
            }
            Event::StringPart(part) => {
                self.chars = self.chars.saturating_add(chars(part));
                if self.key_at(1) == Some(Field::Model) {
                    match self.model.get_mut(self.model_len..self.model_len + part.len()) {
                        Some(dst) => {
                            dst.copy_from_slice(part);
                            self.model_len += part.len();
                        }
                        None => self.model_too_long = true,
                    }
                }
                if self.key_at(1) == Some(Field::ServiceTier) {
                    let end = self.tier_name_len.and_then(|len| len.checked_add(part.len()));
                    let dst =
                        self.tier_name_len.zip(end).and_then(|(len, end)| self.tier_name.get_mut(len..end));
                    self.tier_name_len = dst.map(|dst| dst.copy_from_slice(part)).and(end);
                }
            }
            Event::StringEnd => {
                let chars = core::mem::take(&mut self.chars);
                self.value(Value::String, Size { chars, ids: 0 });
            }
            Event::Number(n) => {
                let ids = u64::from(!matches!(n, Number::Fractional));
                self.value(Value::Number(n), Size { chars: 0, ids });
            }
            Event::Bool(b) => self.value(Value::Bool(b), Size::default()),
            Event::Null => self.value(Value::Null, Size::default()),
        }
    }
}

//! The request-body scanner: what an OpenAI-compatible body asks for, read in one pass without
//! allocating, so a C gateway reserves what the ASGI middleware would for the same body.

use sluicegate_core::json::JsonError;
use sluicegate_core::key::MODEL_KEY_MAX;
use sluicegate_core::openai_request::{RequestFields, ScanError, scan};

use crate::boundary::{boundary, bytes, sg_result, sg_result::*};
use crate::engine::sg_service_tier;

/// Bytes of `sg_openai_request.model`: the longest model key.
pub const SG_MODEL_MAX: usize = 128;

// cbindgen copies only literals into the header, so the literal is checked against core's limit.
const _: () = assert!(SG_MODEL_MAX == MODEL_KEY_MAX);

/// What a request body asks for, filled by `sg_openai_request_scan`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct sg_openai_request {
    /// The model id (UTF-8, escapes decoded), `model_len` bytes; not NUL-terminated.
    pub model: [u8; SG_MODEL_MAX],
    /// Bytes of `model` used: 1 to `SG_MODEL_MAX` on `SG_OK`.
    pub model_len: usize,
    /// `max_completion_tokens`, or else `max_tokens`; 0 when the body gives neither, and the
    /// gateway reserves its own default.
    pub max_tokens: u64,
    /// Completions asked for (`n`; 1 when absent).
    pub n: u64,
    /// `"stream": true`.
    pub stream: bool,
    /// `"stream_options": {"include_usage": true}`: the stream ends with a usage chunk.
    pub include_usage: bool,
    /// The body names a service tier (`"service_tier"` is `"flex"`, `"default"` or
    /// `"priority"`; OpenAI's `"auto"` and other values name none).
    pub service_tier_given: bool,
    /// The `sg_service_tier` named, when `service_tier_given`; `SG_SERVICE_TIER_DEFAULT`
    /// otherwise. The account's grant caps it: a request is served at the lower of the two.
    pub service_tier: u32,
    /// Characters of the prompt's text (in `messages`, `prompt`, `input`, `instructions`,
    /// `system`).
    pub prompt_chars: u64,
    /// Integers in the prompt: the token ids of a pre-tokenized prompt.
    pub prompt_token_ids: u64,
    /// The prompt's tokens as the ASGI middleware estimates them: `prompt_chars / 4 +
    /// prompt_token_ids`, at least 1 (for `sg_request.prompt_tokens`).
    pub prompt_tokens: u64,
    /// On `SG_ERR_JSON_MALFORMED` and `SG_ERR_JSON_TOO_DEEP`, the offset of the offending byte
    /// in `body`; 0 otherwise.
    pub error_offset: u64,
}

const ZERO: sg_openai_request = sg_openai_request {
    model: [0; SG_MODEL_MAX],
    model_len: 0,
    max_tokens: 0,
    n: 0,
    stream: false,
    include_usage: false,
    service_tier_given: false,
    service_tier: 0,
    prompt_chars: 0,
    prompt_token_ids: 0,
    prompt_tokens: 0,
    error_offset: 0,
};

impl From<ScanError> for sg_result {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::Json(JsonError::Malformed { .. }) => SgErrJsonMalformed,
            ScanError::Json(JsonError::TooDeep { .. }) => SgErrJsonTooDeep,
            ScanError::Json(JsonError::Truncated) => SgErrJsonTruncated,
            ScanError::NotAnObject => SgErrBodyNotAnObject,
            ScanError::MissingModel => SgErrBodyMissingModel,
            ScanError::InvalidModel => SgErrBodyInvalidModel,
            ScanError::InvalidMaxTokens => SgErrBodyInvalidMaxTokens,
            ScanError::InvalidN => SgErrBodyInvalidN,
        }
    }
}

fn request_of(f: &RequestFields) -> sg_openai_request {
    let mut model = [0; SG_MODEL_MAX];
    let given = f.model();
    // Never short: core keeps at most MODEL_KEY_MAX bytes, asserted equal to SG_MODEL_MAX.
    if let Some(dst) = model.get_mut(..given.len()) {
        dst.copy_from_slice(given);
    }
    sg_openai_request {
        model,
        model_len: given.len(),
        max_tokens: f.max_tokens.unwrap_or(0),
        n: f.n,
        stream: f.stream,
        include_usage: f.include_usage,
        service_tier_given: f.service_tier.is_some(),
        service_tier: sg_service_tier::of(f.service_tier.unwrap_or_default()),
        prompt_chars: f.prompt_chars,
        prompt_token_ids: f.prompt_token_ids,
        prompt_tokens: f.prompt_tokens(),
        error_offset: 0,
    }
}

fn error_of(e: ScanError) -> sg_openai_request {
    let error_offset = match e {
        ScanError::Json(JsonError::Malformed { offset } | JsonError::TooDeep { offset }) => offset,
        _ => 0,
    };
    sg_openai_request { error_offset, ..ZERO }
}

/// Reads an OpenAI-compatible request body (Chat Completions or Completions) whole, in one pass
/// and without allocating, by the ASGI middleware's rules: a later duplicate key wins, `null` is
/// as absent, counts are integers from 1 to 2^32, nesting deeper than 64 is refused. On `SG_OK`
/// `*out` holds what the body asks for. `SG_ERR_JSON_*` and `SG_ERR_BODY_*` mean the body is to
/// be answered 400. On those and on `SG_ERR_NULL` for `body`, `*out` is zeroed except
/// `error_offset`, so it never holds a stale request. `body` may be NULL only with `len` 0, an
/// empty body (`SG_ERR_JSON_TRUNCATED`).
///
/// # Safety
/// `body` NULL (with `len` 0) or `len` readable bytes; `out` NULL or writable (its contents
/// need not be initialised).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_openai_request_scan(
    body: *const u8,
    len: usize,
    out: *mut sg_openai_request,
) -> sg_result {
    boundary(|| {
        if out.is_null() {
            return Err(SgErrNull);
        }
        // SAFETY: forwarded from this function's contract.
        let (value, result) = match unsafe { bytes(body, len) } {
            Err(code) => (ZERO, Err(code)),
            Ok(body) => match scan(body) {
                Ok(fields) => (request_of(&fields), Ok(())),
                Err(e) => (error_of(e), Err(e.into())),
            },
        };
        // SAFETY: out is non-null and writable by the contract. Written without a `&mut` to the
        // old contents, which may be uninitialised (an invalid `bool`).
        unsafe { out.write(value) };
        result
    })
}

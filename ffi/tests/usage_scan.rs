//! `sg_usage_scanner_*` called as C calls them: a stream fed byte by byte reads as core's
//! scanner fed whole, generated characters counted as events end, a JSON body, unusable usage
//! flagged, the scanner refused before init and after finish, NULL and misaligned arguments.

use std::mem::{MaybeUninit, align_of, offset_of, size_of};

use sluicegate::{
    SG_USAGE_SCANNER_WORDS, sg_response_usage, sg_result, sg_result_str, sg_usage_scanner,
    sg_usage_scanner_feed, sg_usage_scanner_finish, sg_usage_scanner_generated_chars, sg_usage_scanner_init,
};
use sluicegate_core::openai_usage::{ResponseUsage, UsageScanner};

/// A streamed chat completion as OpenAI sends it with `stream_options.include_usage`: a role
/// chunk, content deltas (" wörld" is 6 characters in 7 bytes), a finish chunk, each with
/// `"usage": null`, then the usage chunk and `[DONE]`.
const STREAM: &str = concat!(
    r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" wörld"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":1017,"completion_tokens":3,"total_tokens":1020,"prompt_tokens_details":{"cached_tokens":1000,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// What STREAM reports.
const STREAM_USAGE: sg_response_usage = sg_response_usage {
    prompt_tokens: 1017,
    cached_tokens: 1000,
    completion_tokens: 3,
    generated_chars: 11,
    objects: 5,
    has_usage: true,
    has_prompt_tokens: true,
    malformed_usage: false,
};

const ZERO: sg_response_usage = sg_response_usage {
    prompt_tokens: 0,
    cached_tokens: 0,
    completion_tokens: 0,
    generated_chars: 0,
    objects: 0,
    has_usage: false,
    has_prompt_tokens: false,
    malformed_usage: false,
};

fn new_storage(fill: u8) -> Box<sg_usage_scanner> {
    Box::new(sg_usage_scanner { opaque: [u64::from_ne_bytes([fill; 8]); SG_USAGE_SCANNER_WORDS] })
}

/// A scanner initialised in storage first filled with 0xFF bytes, as stale C memory.
fn scanner(stream: bool) -> Box<sg_usage_scanner> {
    let mut s = new_storage(0xFF);
    // SAFETY: s is writable storage.
    assert_eq!(unsafe { sg_usage_scanner_init(&mut *s, stream) }, sg_result::SgOk);
    s
}

fn feed(s: &mut sg_usage_scanner, bytes: &[u8]) {
    // SAFETY: s is storage for a scanner; bytes is valid for its length.
    assert_eq!(unsafe { sg_usage_scanner_feed(s, bytes.as_ptr(), bytes.len()) }, sg_result::SgOk);
}

fn chars(s: &sg_usage_scanner) -> (sg_result, u64) {
    let mut chars = u64::MAX;
    // SAFETY: s is storage for a scanner; chars is writable.
    let rc = unsafe { sg_usage_scanner_generated_chars(s, &mut chars) };
    (rc, chars)
}

/// Finishes with `*out` first filled with 0xFF bytes, as stale or uninitialised C memory.
fn finish_raw(s: *mut sg_usage_scanner) -> (sg_result, sg_response_usage) {
    let mut out = MaybeUninit::<sg_response_usage>::uninit();
    // One pointer for the fill, the call and the checks (a second `as_mut_ptr` would retag).
    let p = out.as_mut_ptr();
    let base = p.cast::<u8>();
    // SAFETY: `out` is size_of::<sg_response_usage>() writable bytes.
    unsafe { base.write_bytes(0xFF, size_of::<sg_response_usage>()) };
    // SAFETY: s is NULL or storage for a scanner; out is writable.
    let rc = unsafe { sg_usage_scanner_finish(s, p) };
    for off in [
        offset_of!(sg_response_usage, has_usage),
        offset_of!(sg_response_usage, has_prompt_tokens),
        offset_of!(sg_response_usage, malformed_usage),
    ] {
        // SAFETY: within `out`, and initialised (0xFF or written).
        let byte = unsafe { base.add(off).read() };
        assert!(byte <= 1, "bool at offset {off} not written: {byte:#x}");
    }
    // SAFETY: the bools are valid (checked above) and every other field is valid for any bytes.
    (rc, unsafe { out.assume_init() })
}

fn finish(s: &mut sg_usage_scanner) -> sg_response_usage {
    let (rc, out) = finish_raw(s);
    assert_eq!(rc, sg_result::SgOk);
    out
}

/// What core's scanner reports for `response` fed whole, in the C struct's terms.
fn core_reads(stream: bool, response: &[u8]) -> sg_response_usage {
    let mut core = UsageScanner::new(stream);
    core.feed(response);
    let ResponseUsage { usage, malformed_usage, generated_chars, objects } = core.finish();
    sg_response_usage {
        prompt_tokens: usage.and_then(|u| u.prompt_tokens).unwrap_or(0),
        cached_tokens: usage.map_or(0, |u| u.cached_tokens),
        completion_tokens: usage.map_or(0, |u| u.completion_tokens),
        generated_chars,
        objects,
        has_usage: usage.is_some(),
        has_prompt_tokens: usage.is_some_and(|u| u.prompt_tokens.is_some()),
        malformed_usage,
    }
}

/// Feeds `response` in pieces of `piece` bytes and finishes.
fn read_in_pieces(stream: bool, response: &[u8], piece: usize) -> sg_response_usage {
    let mut s = scanner(stream);
    for chunk in response.chunks(piece) {
        feed(&mut s, chunk);
    }
    finish(&mut s)
}

#[test]
fn the_storage_fits_the_scanner_with_headroom() {
    let needed = size_of::<UsageScanner>() + 8; // and the magic word
    let given = size_of::<sg_usage_scanner>();
    assert_eq!(given, 8 * SG_USAGE_SCANNER_WORDS);
    assert_eq!(align_of::<sg_usage_scanner>(), 8);
    assert!(needed <= given, "{needed} > {given}");
    // Not wasteful: a smaller round size would not do with some headroom.
    assert!(needed > given / 2, "{needed} of {given}: SG_USAGE_SCANNER_WORDS is too large");
}

#[test]
fn a_stream_fed_byte_by_byte_reads_as_core_fed_whole() {
    let response = STREAM.as_bytes();
    assert_eq!(core_reads(true, response), STREAM_USAGE);
    for piece in [1, 2, 7, 64, response.len()] {
        assert_eq!(read_in_pieces(true, response, piece), STREAM_USAGE, "pieces of {piece}");
    }
}

#[test]
fn generated_chars_grow_as_each_event_ends() {
    let response = STREAM.as_bytes();
    let mut s = scanner(true);
    assert_eq!(chars(&s), (sg_result::SgOk, 0));
    // (byte index, chars after it) wherever the count changed.
    let mut changes = Vec::new();
    let mut last = 0;
    for (i, b) in response.iter().enumerate() {
        feed(&mut s, std::slice::from_ref(b));
        let (rc, now) = chars(&s);
        assert_eq!(rc, sg_result::SgOk);
        if now != last {
            changes.push((i, now));
            last = now;
        }
    }
    // The "Hello" event counts at the newline ending its line, and " wörld" at the end of its own.
    let line_end =
        |n: usize| response.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(n).map(|(i, _)| i);
    assert_eq!(changes, vec![(line_end(2).unwrap(), 5), (line_end(4).unwrap(), 11)]);
    assert_eq!(finish(&mut s), STREAM_USAGE);
}

#[test]
fn an_unterminated_last_event_counts_at_finish() {
    let mut s = scanner(true);
    feed(&mut s, br#"data: {"choices": [{"delta": {"content": "abc"}}], "usage": {"completion_tokens": 2}}"#);
    assert_eq!(chars(&s), (sg_result::SgOk, 0));
    let out = finish(&mut s);
    assert_eq!(
        out,
        sg_response_usage { completion_tokens: 2, generated_chars: 3, objects: 1, has_usage: true, ..ZERO }
    );
}

#[test]
fn a_json_body_reads_its_message_and_usage() {
    let body = r#"{"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour à vous",
            "refusal": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}"#
        .as_bytes();
    // "Bonjour à vous" (14 characters) and the arguments `{"x": 1}` (8).
    let want = sg_response_usage {
        prompt_tokens: 20,
        completion_tokens: 9,
        generated_chars: 22,
        objects: 1,
        has_usage: true,
        has_prompt_tokens: true,
        ..ZERO
    };
    assert_eq!(core_reads(false, body), want);
    for piece in [1, 3, body.len()] {
        assert_eq!(read_in_pieces(false, body, piece), want, "pieces of {piece}");
    }
    // A body's characters count at finish: none before.
    let mut s = scanner(false);
    feed(&mut s, body);
    assert_eq!(chars(&s), (sg_result::SgOk, 0));
    assert_eq!(finish(&mut s), want);
    // Read as a stream, a body is no event: nothing.
    assert_eq!(read_in_pieces(true, body, 5), ZERO);
    // A body's `delta` is not its text, and a body without usage has none.
    let delta = br#"{"choices": [{"delta": {"content": "ab"}, "message": {"content": "xyz"}}]}"#;
    assert_eq!(read_in_pieces(false, delta, 4), sg_response_usage { generated_chars: 3, objects: 1, ..ZERO });
    // Not JSON: nothing, and no error.
    assert_eq!(read_in_pieces(false, b"<html>502 Bad Gateway</html>", 4), ZERO);
}

#[test]
fn unusable_usage_is_flagged_and_never_used() {
    let usable = r#"data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}"#;
    let events = |usage: &str| {
        format!("{usable}\n\ndata: {{\"choices\": [], \"usage\": {usage}}}\n\ndata: [DONE]\n\n")
    };
    for bad in [
        r#"{"prompt_tokens": 7}"#,
        r#"{"prompt_tokens": 7, "completion_tokens": -1}"#,
        r#"{"completion_tokens": 4294967297}"#,
        r#"{"completion_tokens": 2.5}"#,
        r#"{"completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": "9"}}"#,
        r#""none""#,
    ] {
        let response = events(bad);
        let want = sg_response_usage {
            prompt_tokens: 7,
            completion_tokens: 4,
            objects: 2,
            has_usage: true,
            has_prompt_tokens: true,
            malformed_usage: true,
            ..ZERO
        };
        assert_eq!(core_reads(true, response.as_bytes()), want, "{bad}");
        assert_eq!(read_in_pieces(true, response.as_bytes(), 1), want, "{bad}");
        // Alone, it leaves no usage.
        let alone = format!("data: {{\"usage\": {bad}}}\n\n");
        let want = sg_response_usage { objects: 1, malformed_usage: true, ..ZERO };
        assert_eq!(read_in_pieces(true, alone.as_bytes(), 1), want, "{bad}");
    }
    // Without prompt_tokens, usage is still usable.
    let out = read_in_pieces(true, b"data: {\"usage\": {\"completion_tokens\": 4}}\n\n", 1);
    assert_eq!(out, sg_response_usage { completion_tokens: 4, objects: 1, has_usage: true, ..ZERO });
}

#[test]
fn a_finished_scanner_is_refused_until_initialised_again() {
    use sg_result::*;
    let mut s = scanner(true);
    feed(&mut s, STREAM.as_bytes());
    assert_eq!(finish(&mut s), STREAM_USAGE);
    assert_eq!(finish_raw(&mut *s), (SgErrScannerNotInitialised, ZERO));
    // SAFETY: s is storage for a scanner; the bytes are valid.
    assert_eq!(unsafe { sg_usage_scanner_feed(&mut *s, b"data".as_ptr(), 4) }, SgErrScannerNotInitialised);
    assert_eq!(chars(&s), (SgErrScannerNotInitialised, 0));

    // Initialised again, it starts afresh; so does a scanner initialised in the middle.
    // SAFETY: s is writable storage.
    assert_eq!(unsafe { sg_usage_scanner_init(&mut *s, true) }, SgOk);
    feed(&mut s, b"data: {\"choices\": [{\"delta\": {\"content\": \"abc\"}}]}\n");
    assert_eq!(chars(&s), (SgOk, 3));
    // SAFETY: as above.
    assert_eq!(unsafe { sg_usage_scanner_init(&mut *s, false) }, SgOk);
    assert_eq!(chars(&s), (SgOk, 0));
    feed(&mut s, br#"{"usage": {"completion_tokens": 1}}"#);
    assert_eq!(
        finish(&mut s),
        sg_response_usage { completion_tokens: 1, objects: 1, has_usage: true, ..ZERO }
    );
}

#[test]
fn a_scanner_never_initialised_is_refused_whatever_its_bytes() {
    use sg_result::*;
    for fill in [0x00, 0xFF, 0xA5] {
        let mut s = new_storage(fill);
        let before = s.opaque;
        // SAFETY: s is storage for a scanner; the bytes are valid.
        let rc = unsafe { sg_usage_scanner_feed(&mut *s, STREAM.as_ptr(), STREAM.len()) };
        assert_eq!(rc, SgErrScannerNotInitialised, "{fill:#x}");
        assert_eq!(chars(&s), (SgErrScannerNotInitialised, 0), "{fill:#x}");
        assert_eq!(finish_raw(&mut *s), (SgErrScannerNotInitialised, ZERO), "{fill:#x}");
        assert!(s.opaque == before, "{fill:#x}: a refused call wrote to the scanner");
    }
}

#[test]
fn null_arguments_are_refused_and_a_null_empty_chunk_is_nothing() {
    use sg_result::*;
    use std::ptr::{null, null_mut};
    // SAFETY: NULL is refused by every function.
    unsafe {
        assert_eq!(sg_usage_scanner_init(null_mut(), true), SgErrNull);
        assert_eq!(sg_usage_scanner_feed(null_mut(), b"x".as_ptr(), 1), SgErrNull);
        assert_eq!(sg_usage_scanner_feed(null_mut(), null(), 0), SgErrNull);
    }
    let mut c = u64::MAX;
    // SAFETY: c is writable.
    assert_eq!(unsafe { sg_usage_scanner_generated_chars(null(), &mut c) }, SgErrNull);
    assert_eq!(c, 0);
    assert_eq!(finish_raw(null_mut()), (SgErrNull, ZERO));

    let mut s = scanner(true);
    let half = STREAM.len() / 2;
    feed(&mut s, &STREAM.as_bytes()[..half]);
    let at_half = chars(&s);
    // SAFETY: s is an initialised scanner; NULL bytes are accepted with length 0 only, and a
    // NULL out is refused.
    unsafe {
        assert_eq!(sg_usage_scanner_feed(&mut *s, null(), 0), SgOk);
        assert_eq!(sg_usage_scanner_feed(&mut *s, null(), 5), SgErrNull);
        assert_eq!(sg_usage_scanner_generated_chars(&*s, null_mut()), SgErrNull);
        assert_eq!(sg_usage_scanner_finish(&mut *s, null_mut()), SgErrNull);
    }
    // None of those changed the scanner, nor finished it.
    assert_eq!(chars(&s), at_half);
    feed(&mut s, &STREAM.as_bytes()[half..]);
    assert_eq!(finish(&mut s), STREAM_USAGE);
}

#[test]
fn misaligned_storage_is_refused_and_not_written() {
    let mut words = vec![0u64; SG_USAGE_SCANNER_WORDS + 1];
    // 4 bytes in: within the buffer, but not 8-byte aligned.
    let p = words.as_mut_ptr().cast::<u8>().wrapping_add(4).cast::<sg_usage_scanner>();
    let mut out = ZERO;
    let mut c = 0;
    // SAFETY: p is within a writable buffer of the right size; each function refuses it before
    // any access.
    unsafe {
        assert_eq!(sg_usage_scanner_init(p, true), sg_result::SgErrInvalidArgument);
        assert_eq!(sg_usage_scanner_feed(p, b"x".as_ptr(), 1), sg_result::SgErrInvalidArgument);
        assert_eq!(sg_usage_scanner_generated_chars(p, &mut c), sg_result::SgErrInvalidArgument);
        assert_eq!(sg_usage_scanner_finish(p, &mut out), sg_result::SgErrInvalidArgument);
    }
    assert!(words.iter().all(|w| *w == 0));
}

#[test]
fn the_new_code_has_its_own_description() {
    let text = |code: u32| {
        // SAFETY: sg_result_str returns a static NUL-terminated string for any code.
        unsafe { std::ffi::CStr::from_ptr(sg_result_str(code)) }.to_str().expect("UTF-8").to_owned()
    };
    let code = sg_result::SgErrScannerNotInitialised as u32;
    assert_eq!(code, 45);
    assert_eq!(text(code), "usage scanner not initialised (or already finished)");
    assert!((0..code).all(|old| text(old) != text(code)));
}

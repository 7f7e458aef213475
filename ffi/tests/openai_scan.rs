//! `sg_openai_request_scan` called as C calls it: the fields of a body, each result code, NULL
//! arguments, and `*out` fully overwritten (never stale) whatever the outcome.

use std::mem::{MaybeUninit, offset_of, size_of};

use sluicegate::{
    SG_MODEL_MAX, sg_openai_request, sg_openai_request_scan, sg_result, sg_result_str, sg_service_tier,
};

/// Scans with `*out` first filled with 0xFF bytes, as stale or uninitialised C memory.
fn scan_raw(body: *const u8, len: usize) -> (sg_result, sg_openai_request) {
    let mut out = MaybeUninit::<sg_openai_request>::uninit();
    // One pointer for the fill, the call and the checks (a second `as_mut_ptr` would retag).
    let p = out.as_mut_ptr();
    let base = p.cast::<u8>();
    // SAFETY: `out` is size_of::<sg_openai_request>() writable bytes.
    unsafe { base.write_bytes(0xFF, size_of::<sg_openai_request>()) };
    // SAFETY: body is NULL or `len` readable bytes (the callers'), out is writable.
    let rc = unsafe { sg_openai_request_scan(body, len, p) };
    // A bool left 0xFF would be an invalid value: check the bytes before reading the struct.
    for off in [
        offset_of!(sg_openai_request, stream),
        offset_of!(sg_openai_request, include_usage),
        offset_of!(sg_openai_request, service_tier_given),
    ] {
        // SAFETY: within `out`, and initialised (0xFF or written).
        let byte = unsafe { base.add(off).read() };
        assert!(byte <= 1, "bool at offset {off} not written: {byte:#x}");
    }
    // SAFETY: the bools are valid (checked above) and every other field is valid for any bytes.
    (rc, unsafe { out.assume_init() })
}

fn scan(body: &[u8]) -> (sg_result, sg_openai_request) {
    scan_raw(body.as_ptr(), body.len())
}

fn zeroed(error_offset: u64) -> sg_openai_request {
    sg_openai_request {
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
        error_offset,
    }
}

fn model(r: &sg_openai_request) -> &[u8] {
    &r.model[..r.model_len]
}

/// Asserts `body` fails with `code`, `*out` zeroed but for `error_offset`.
fn assert_refused(body: &[u8], code: sg_result, error_offset: u64) {
    let (rc, out) = scan(body);
    assert_eq!(rc, code, "{}", String::from_utf8_lossy(body));
    assert_eq!(out, zeroed(error_offset), "{}", String::from_utf8_lossy(body));
}

#[test]
fn a_chat_body_gives_its_model_counts_flags_and_prompt_size() {
    let body = r#"{"model": "llama-v3p1-8b", "max_tokens": 200, "n": 2, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "Sois brève."},
                     {"role": "user", "content": [{"type": "text", "text": "How far is the moon?"}]}]}"#;
    let (rc, out) = scan(body.as_bytes());
    assert_eq!(rc, sg_result::SgOk);
    assert_eq!(model(&out), b"llama-v3p1-8b");
    assert_eq!((out.max_tokens, out.n, out.stream, out.include_usage), (200, 2, true, true));
    // 11 + 20 characters (not bytes: "è" is two); "role" and "type" are not prompt text.
    assert_eq!((out.prompt_chars, out.prompt_token_ids, out.prompt_tokens), (31, 0, 7));
    assert_eq!(out.error_offset, 0);
}

#[test]
fn the_service_tier_is_reported_with_whether_the_body_named_one() {
    use sg_service_tier::*;
    for (extra, given, tier) in [
        ("", false, SgServiceTierDefault),
        (r#", "service_tier": "auto""#, false, SgServiceTierDefault),
        (r#", "service_tier": "flex""#, true, SgServiceTierFlex),
        (r#", "service_tier": "default""#, true, SgServiceTierDefault),
        (r#", "service_tier": "priority""#, true, SgServiceTierPriority),
    ] {
        let body = format!(r#"{{"model": "m"{extra}}}"#);
        let (rc, out) = scan(body.as_bytes());
        assert_eq!(rc, sg_result::SgOk, "{body}");
        assert_eq!((out.service_tier_given, out.service_tier), (given, tier as u32), "{body}");
    }
}

#[test]
fn max_completion_tokens_wins_over_max_tokens_in_either_order() {
    for body in [
        r#"{"model": "m", "max_tokens": 100, "max_completion_tokens": 300}"#,
        r#"{"max_completion_tokens": 300, "model": "m", "max_tokens": 100}"#,
    ] {
        let (rc, out) = scan(body.as_bytes());
        assert_eq!(rc, sg_result::SgOk, "{body}");
        assert_eq!(out.max_tokens, 300, "{body}");
    }
}

#[test]
fn absent_fields_read_as_their_defaults_and_token_ids_count_one_each() {
    let (rc, out) = scan(br#"{"model": "m", "max_tokens": null}"#);
    assert_eq!(rc, sg_result::SgOk);
    // No max_tokens: 0, the gateway's default; n 1; at least one prompt token.
    assert_eq!((out.max_tokens, out.n, out.stream, out.include_usage), (0, 1, false, false));
    assert_eq!((out.prompt_chars, out.prompt_token_ids, out.prompt_tokens), (0, 0, 1));

    let (rc, out) = scan(br#"{"model": "m", "prompt": [1, 2, 3], "stream": 1}"#);
    assert_eq!(rc, sg_result::SgOk);
    assert_eq!((out.prompt_chars, out.prompt_token_ids, out.prompt_tokens), (0, 3, 3));
    assert!(!out.stream, "only `true` streams");

    let (rc, out) = scan(br#"{"model": "m", "stream": false, "stream_options": {"include_usage": true}}"#);
    assert_eq!(rc, sg_result::SgOk);
    assert_eq!((out.stream, out.include_usage), (false, true));
}

#[test]
fn the_longest_model_fits_and_one_byte_more_is_refused() {
    let fits = format!(r#"{{"model": "{}"}}"#, "m".repeat(SG_MODEL_MAX));
    let (rc, out) = scan(fits.as_bytes());
    assert_eq!(rc, sg_result::SgOk);
    assert_eq!(model(&out), "m".repeat(SG_MODEL_MAX).as_bytes());

    let too_long = format!(r#"{{"model": "{}"}}"#, "m".repeat(SG_MODEL_MAX + 1));
    assert_refused(too_long.as_bytes(), sg_result::SgErrBodyInvalidModel, 0);
}

#[test]
fn each_refusal_has_its_code_and_zeroes_out_but_the_offset() {
    use sg_result::*;
    // `x` is byte 10.
    assert_refused(br#"{"model": x}"#, SgErrJsonMalformed, 10);
    // The 65th `[` (byte 64) is one too deep; 64 are JSON, just not an object.
    assert_refused(format!("{}{}", "[".repeat(65), "]".repeat(65)).as_bytes(), SgErrJsonTooDeep, 64);
    assert_refused(format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes(), SgErrBodyNotAnObject, 0);
    assert_refused(br#"{"model":"m""#, SgErrJsonTruncated, 0);
    assert_refused(b"", SgErrJsonTruncated, 0);
    assert_refused(b"[1]", SgErrBodyNotAnObject, 0);
    assert_refused(br#"{"messages": []}"#, SgErrBodyMissingModel, 0);
    assert_refused(br#"{"model": ""}"#, SgErrBodyMissingModel, 0);
    assert_refused(br#"{"model": 5}"#, SgErrBodyMissingModel, 0);
    assert_refused(br#"{"model": "m", "max_tokens": 0}"#, SgErrBodyInvalidMaxTokens, 0);
    assert_refused(br#"{"model": "m", "n": 1.5}"#, SgErrBodyInvalidN, 0);
}

#[test]
fn null_out_is_refused_and_null_body_is_an_empty_body_only_with_length_0() {
    let body = br#"{"model": "m"}"#;
    // SAFETY: body is valid for its length; out is NULL, which is refused.
    let rc = unsafe { sg_openai_request_scan(body.as_ptr(), body.len(), std::ptr::null_mut()) };
    assert_eq!(rc, sg_result::SgErrNull);

    let (rc, out) = scan_raw(std::ptr::null(), 0);
    assert_eq!((rc, out), (sg_result::SgErrJsonTruncated, zeroed(0)));
    let (rc, out) = scan_raw(std::ptr::null(), 5);
    assert_eq!((rc, out), (sg_result::SgErrNull, zeroed(0)));
}

#[test]
fn the_new_codes_have_their_own_descriptions() {
    let text = |code: u32| {
        // SAFETY: sg_result_str returns a static NUL-terminated string for any code.
        unsafe { std::ffi::CStr::from_ptr(sg_result_str(code)) }.to_str().expect("UTF-8").to_owned()
    };
    let new = 37..=44;
    assert_eq!(sg_result::SgErrJsonMalformed as u32, *new.start());
    assert_eq!(sg_result::SgErrBodyInvalidN as u32, *new.end());
    let texts: Vec<String> = new.map(text).collect();
    for (i, t) in texts.iter().enumerate() {
        assert!(!t.is_empty() && t != "unknown result code", "{t}");
        assert!(!texts[..i].contains(t) && (0..37).all(|old| text(old) != *t), "{t} is not distinct");
    }
    assert_ne!(text(45), "unknown result code", "45 is SG_ERR_SCANNER_NOT_INITIALISED");
}

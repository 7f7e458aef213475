//! The response usage scanner on arbitrary bytes, as a body and as a stream: no input may panic,
//! and these must hold (a failed assertion is a crash the fuzzer reports):
//!
//! - fed in pieces of any size, the response reads as it reads whole;
//! - the C API, fed the same pieces in caller-owned storage, reads the same;
//! - a usage read has counts of at most 2^32.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate::*;
use sluicegate_core::openai_usage::{ResponseUsage, UsageScanner};

fn read(stream: bool, data: &[u8], piece: usize) -> ResponseUsage {
    let mut scanner = UsageScanner::new(stream);
    for chunk in data.chunks(piece.max(1)) {
        scanner.feed(chunk);
    }
    scanner.finish()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else { return };
    let stream = first & 1 == 1;
    let piece = usize::from(first >> 1) + 1;
    let whole = read(stream, data, data.len());
    assert_eq!(read(stream, data, piece), whole);
    if let Some(u) = whole.usage {
        let max = 1 << 32;
        assert!(u.completion_tokens <= max && u.cached_tokens <= max && u.prompt_tokens.is_none_or(|p| p <= max));
    }
    // SAFETY: the storage is a valid, aligned sg_usage_scanner; the pieces are readable.
    let mut storage: sg_usage_scanner = unsafe { std::mem::zeroed() };
    let mut out: sg_response_usage = unsafe { std::mem::zeroed() };
    unsafe {
        assert_eq!(sg_usage_scanner_init(&mut storage, stream), sg_result::SgOk);
        for chunk in data.chunks(piece) {
            assert_eq!(sg_usage_scanner_feed(&mut storage, chunk.as_ptr(), chunk.len()), sg_result::SgOk);
        }
        assert_eq!(sg_usage_scanner_finish(&mut storage, &mut out), sg_result::SgOk);
    }
    assert_eq!(out.generated_chars, whole.generated_chars);
    assert_eq!(out.objects, whole.objects);
    assert_eq!(out.malformed_usage, whole.malformed_usage);
    assert_eq!(out.has_usage, whole.usage.is_some());
    if let Some(u) = whole.usage {
        assert_eq!((out.completion_tokens, out.cached_tokens), (u.completion_tokens, u.cached_tokens));
        assert_eq!((out.has_prompt_tokens, out.prompt_tokens), (u.prompt_tokens.is_some(), u.prompt_tokens.unwrap_or(0)));
    }
});

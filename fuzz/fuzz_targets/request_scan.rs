//! The request-body scanner on arbitrary bytes, through Rust and through the C API: no input may
//! panic or cross the boundary as a crash, and these must hold (a failed assertion is a crash the
//! fuzzer reports):
//!
//! - the C API gives the code and fields Rust gives;
//! - lexed in two pieces at any cut, the body gets the verdict it gets whole;
//! - an accepted body's model is 1 to 128 bytes of UTF-8, its counts are 1 to 2^32, and its
//!   prompt estimate is 1 to 2^32.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate::*;
use sluicegate_core::json::{Event, Lexer};
use sluicegate_core::openai_request::{MAX_COUNT, scan};

fn verdict(body: &[u8], cut: usize) -> Result<(), sluicegate_core::json::JsonError> {
    let mut lexer = Lexer::new();
    let mut sink = |_: Event<'_>| {};
    let (head, tail) = body.split_at(cut.min(body.len()));
    lexer.feed(head, &mut sink)?;
    lexer.feed(tail, &mut sink)?;
    lexer.finish(&mut sink)
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| usize::from(*b) * data.len() / 256);
    assert_eq!(verdict(data, cut), verdict(data, data.len()));
    let rust = scan(data);
    // SAFETY: `data` is readable for its length; `out` is a valid place for the result.
    let mut out: sg_openai_request = unsafe { std::mem::zeroed() };
    let code = unsafe { sg_openai_request_scan(data.as_ptr(), data.len(), &mut out) };
    match rust {
        Ok(f) => {
            assert_eq!(code, sg_result::SgOk);
            assert_eq!(&out.model[..out.model_len], f.model());
            assert!(!f.model().is_empty() && f.model().len() <= 128);
            assert!(std::str::from_utf8(f.model()).is_ok());
            assert_eq!(out.max_tokens, f.max_tokens.unwrap_or(0));
            assert!(f.max_tokens.is_none_or(|m| (1..=MAX_COUNT).contains(&m)));
            assert!((1..=MAX_COUNT).contains(&f.n) && out.n == f.n);
            assert!((1..=MAX_COUNT).contains(&f.prompt_tokens()) && out.prompt_tokens == f.prompt_tokens());
            assert_eq!((out.stream, out.include_usage), (f.stream, f.include_usage));
        }
        Err(_) => assert_ne!(code, sg_result::SgOk),
    }
});

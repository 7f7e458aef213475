//! The response-usage scanner: what an OpenAI-compatible response reports it used, read as its
//! bytes pass (a body filter's buffers), in storage the caller owns, so a C gateway settles
//! what the ASGI middleware would for the same response without the library allocating.

use core::mem::{align_of, needs_drop, size_of};
use core::ptr::addr_of_mut;

use sluicegate_core::openai_usage::{ResponseUsage, UsageScanner};

use crate::boundary::{boundary, bytes, sg_result, sg_result::*};

/// 64-bit words of `sg_usage_scanner`.
pub const SG_USAGE_SCANNER_WORDS: usize = 512;

/// A response-usage scanner in storage the caller owns (a local, or a request's memory pool):
/// opaque, 8-byte aligned, `8 * SG_USAGE_SCANNER_WORDS` bytes. `sg_usage_scanner_init` must come
/// first: the other functions check a magic number in the first word before reading the rest,
/// and refuse a scanner never initialised (zeroed or garbage) or already finished with
/// `SG_ERR_SCANNER_NOT_INITIALISED`. It owns no memory, so it may be discarded at any time
/// without `sg_usage_scanner_finish`; one thread at a time may use it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sg_usage_scanner {
    /// Private to the library.
    pub opaque: [u64; SG_USAGE_SCANNER_WORDS],
}

/// What a whole response reported, filled by `sg_usage_scanner_finish`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct sg_response_usage {
    /// `usage.prompt_tokens` of the last usable `usage`, when `has_prompt_tokens`; else 0.
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens` of the last usable `usage` (0 when absent):
    /// prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// `usage.completion_tokens` of the last usable `usage`; 0 without `has_usage`.
    pub completion_tokens: u64,
    /// Characters of generated text: each choice's `text`, and the `content`,
    /// `reasoning_content`, `reasoning`, `refusal` and tool calls' `function.arguments` of its
    /// `delta` (a stream) or `message` (a body). Without usable usage, charge `generated_chars /
    /// 4` generated tokens.
    pub generated_chars: u64,
    /// JSON objects read: 1 for a body that is one, or the stream's events.
    pub objects: u64,
    /// The response had a usable `usage`: `completion_tokens`, and `prompt_tokens` and
    /// `cached_tokens` if given, each an integer from 0 to 2^32. The last usable one counts.
    pub has_usage: bool,
    /// The last usable `usage` gave `prompt_tokens`.
    pub has_prompt_tokens: bool,
    /// Some `usage` was there but unusable (a count that is not an integer from 0 to 2^32, a
    /// missing `completion_tokens`, or not an object); it was not used.
    pub malformed_usage: bool,
}

/// What `sg_usage_scanner` holds: the scanner, behind a word that says it is initialised.
#[repr(C)]
struct Stored {
    magic: u64,
    scanner: UsageScanner,
}

/// `Stored::magic` of an initialised, unfinished scanner ("sgusage1"); anything else is refused.
const MAGIC: u64 = u64::from_le_bytes(*b"sgusage1");

// cbindgen copies only literals into the header, so the literal is checked against the scanner.
const _: () = assert!(size_of::<Stored>() <= size_of::<sg_usage_scanner>());
const _: () = assert!(size_of::<UsageScanner>() <= 8 * SG_USAGE_SCANNER_WORDS);
const _: () = assert!(align_of::<UsageScanner>() <= 8);
const _: () = assert!(align_of::<Stored>() <= align_of::<sg_usage_scanner>());
// C discards the storage without telling the library: nothing may need dropping.
const _: () = assert!(!needs_drop::<UsageScanner>());

/// The scanner in `p`: refused if NULL, misaligned, or not initialised (or finished).
///
/// # Safety
/// `p` NULL or valid for reads of `sg_usage_scanner`.
unsafe fn stored(p: *const sg_usage_scanner) -> Result<*mut Stored, sg_result> {
    if p.is_null() {
        return Err(SgErrNull);
    }
    if !p.cast::<Stored>().is_aligned() {
        return Err(SgErrInvalidArgument);
    }
    // SAFETY: p is non-null, aligned and readable by the contract; a u64 is valid for any bits.
    if unsafe { p.cast::<u64>().read() } != MAGIC {
        return Err(SgErrScannerNotInitialised);
    }
    Ok(p.cast::<Stored>().cast_mut())
}

fn response_of(read: ResponseUsage) -> sg_response_usage {
    let usage = read.usage;
    sg_response_usage {
        prompt_tokens: usage.and_then(|u| u.prompt_tokens).unwrap_or(0),
        cached_tokens: usage.map_or(0, |u| u.cached_tokens),
        completion_tokens: usage.map_or(0, |u| u.completion_tokens),
        generated_chars: read.generated_chars,
        objects: read.objects,
        has_usage: usage.is_some(),
        has_prompt_tokens: usage.is_some_and(|u| u.prompt_tokens.is_some()),
        malformed_usage: read.malformed_usage,
    }
}

/// Starts a scanner in `*scanner` for a response of server-sent events (`stream`: its
/// `Content-Type` is `text/event-stream`, as the ASGI middleware decides) or for a JSON body,
/// whatever `*scanner` held before (an initialised scanner starts again). Nothing is allocated.
/// `SG_ERR_INVALID_ARGUMENT` if `scanner` is not 8-byte aligned.
///
/// # Safety
/// `scanner` NULL or writable (its contents need not be initialised).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_usage_scanner_init(scanner: *mut sg_usage_scanner, stream: bool) -> sg_result {
    boundary(|| {
        if scanner.is_null() {
            return Err(SgErrNull);
        }
        let p = scanner.cast::<Stored>();
        if !p.is_aligned() {
            return Err(SgErrInvalidArgument);
        }
        // SAFETY: p is non-null, aligned and writable by the contract; written without a
        // reference to the old contents, which may be anything.
        unsafe { p.write(Stored { magic: MAGIC, scanner: UsageScanner::new(stream) }) };
        Ok(())
    })
}

/// Reads the next `len` bytes of the response body (decoded: any `Content-Encoding` undone), as
/// they come, in any chunking. `bytes` may be NULL only with `len` 0 (nothing is read). A response that is not what the scanner expects
/// is not an error: it reports nothing (a stream's lines that are not events are skipped). After
/// `SG_ERR_PANIC` the scanner is as if finished.
///
/// # Safety
/// `scanner` NULL or valid and not used by another thread meanwhile; `bytes` NULL (with `len` 0)
/// or `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_usage_scanner_feed(
    scanner: *mut sg_usage_scanner,
    bytes: *const u8,
    len: usize,
) -> sg_result {
    boundary(|| {
        if scanner.is_null() {
            return Err(SgErrNull);
        }
        // SAFETY: forwarded from this function's contract.
        let chunk = unsafe { self::bytes(bytes, len) }?;
        // SAFETY: forwarded from this function's contract.
        let p = unsafe { stored(scanner) }?;
        // SAFETY: p is an initialised `Stored` (its magic says so), writable and used by this
        // thread alone. The magic is cleared while the scanner is borrowed, so a panic leaves
        // it refused, and the borrow is of the other field only.
        unsafe {
            addr_of_mut!((*p).magic).write(0);
            (*addr_of_mut!((*p).scanner)).feed(chunk);
            addr_of_mut!((*p).magic).write(MAGIC);
        }
        Ok(())
    })
}

/// Writes to `*chars` the generated characters of the response read so far (in a stream, those
/// of complete events; a JSON body's count only at finish, so 0 until then), for charging a
/// stream as it goes (`chars / 4` tokens). `*chars` is 0 on any error but `SG_ERR_NULL` for
/// `chars`.
///
/// # Safety
/// `scanner` NULL or valid and not written by another thread meanwhile; `chars` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_usage_scanner_generated_chars(
    scanner: *const sg_usage_scanner,
    chars: *mut u64,
) -> sg_result {
    boundary(|| {
        if chars.is_null() {
            return Err(SgErrNull);
        }
        // SAFETY: forwarded from this function's contract; p, when Ok, is an initialised
        // `Stored` only read here.
        let (value, result) = match unsafe { stored(scanner) } {
            Ok(p) => (unsafe { (*p).scanner.generated_chars() }, Ok(())),
            Err(code) => (0, Err(code)),
        };
        // SAFETY: chars is non-null and writable by the contract.
        unsafe { chars.write(value) };
        result
    })
}

/// Ends the response (a stream's unterminated last line counts) and writes what it reported to
/// `*out`. The scanner is finished: it must be initialised again before any other use (else
/// `SG_ERR_SCANNER_NOT_INITIALISED`). On any error but `SG_ERR_NULL` for `out`, `*out` is
/// zeroed; with `out` NULL the scanner is left as it was.
///
/// # Safety
/// `scanner` NULL or valid and not used by another thread meanwhile; `out` NULL or writable
/// (its contents need not be initialised).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_usage_scanner_finish(
    scanner: *mut sg_usage_scanner,
    out: *mut sg_response_usage,
) -> sg_result {
    boundary(|| {
        if out.is_null() {
            return Err(SgErrNull);
        }
        // SAFETY: forwarded from this function's contract.
        let (value, result) = match unsafe { stored(scanner) } {
            // SAFETY: p is an initialised `Stored`, writable and used by this thread alone; the
            // magic is cleared first (finished, and refused after a panic), and the borrow is of
            // the other field only.
            Ok(p) => unsafe {
                addr_of_mut!((*p).magic).write(0);
                (response_of((*addr_of_mut!((*p).scanner)).finish()), Ok(()))
            },
            Err(code) => (sg_response_usage::default(), Err(code)),
        };
        // SAFETY: out is non-null and writable by the contract. Written without a `&mut` to the
        // old contents, which may be uninitialised (an invalid `bool`).
        unsafe { out.write(value) };
        result
    })
}

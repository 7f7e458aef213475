//! Rendering a decision: status, headers and JSON error body, into caller buffers.

use std::time::{SystemTime, UNIX_EPOCH};

use sluicegate_core::error_body::write_error_body;
use sluicegate_core::headers::write_headers;
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    ConcurrencyLimited, Decision, InvalidRequest, Levels, Metric, Outcome, PerMetric, Permit, RateLimited,
    RawPermit, Shed, SpendRejection,
};

use crate::boundary::{arg, boundary, buffer, out, sg_result, sg_result::*, sized};
use crate::engine::{sg_decision, sg_engine};

/// Header dialects.
#[repr(u32)]
pub enum sg_dialect {
    /// Fireworks `x-ratelimit-*` (per second under fireworks_2026).
    SgDialectFireworks = 0,
    /// Together `x-ratelimit-*`, `x-tokenlimit-*`.
    SgDialectTogether = 1,
    /// OpenAI `x-ratelimit-*-{requests,tokens}`.
    SgDialectOpenai = 2,
    /// Anthropic `anthropic-ratelimit-*`.
    SgDialectAnthropic = 3,
    /// IETF `RateLimit-Policy` / `RateLimit`.
    SgDialectIetf = 4,
}

/// How to render: start from `sg_render_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_render {
    /// An `sg_dialect`.
    pub dialect: u32,
    /// Non-zero: token limits per second (Fireworks 2026).
    pub per_second: u32,
    /// Unix time, ns, at which the engine clock read `monotonic_at` (for Anthropic's RFC 3339
    /// resets): `sg_render_init` sets the system's real time.
    pub unix_ns: u64,
    /// The engine clock (the `now_ns` passed to `sg_admit`) at `unix_ns`: `sg_render_init` sets
    /// `sg_now_ns()`. A gateway with its own clock sets its reading at the same instant.
    pub monotonic_at: u64,
    /// Seeds the jitter of a 503's retry-after (e.g. a hash of the request id).
    pub jitter_seed: u64,
}

fn render_of(r: &sg_render) -> Result<Render, sg_result> {
    let dialect = *Dialect::ALL.get(r.dialect as usize).ok_or(SgErrInvalidArgument)?;
    Ok(Render::new(dialect)
        .per_second(r.per_second != 0)
        .wall_clock(r.unix_ns, r.monotonic_at)
        .jitter_seed(r.jitter_seed))
}

/// Rebuilds the decision from its C form; out-of-range fields are `SG_ERR_INVALID_ARGUMENT`.
fn decision_from(c: &sg_decision) -> Result<Decision, sg_result> {
    let metric = || Metric::ALL.get(c.metric as usize).copied().ok_or(SgErrInvalidArgument);
    let permit = || Permit::from_raw(&RawPermit { words: c.permit.words }).ok_or(SgErrInvalidArgument);
    let outcome = match c.outcome {
        0 => Outcome::Admit(permit()?),
        1 => Outcome::AdmitOverLimit(permit()?),
        2 => Outcome::RejectRateLimited(RateLimited {
            metric: metric()?,
            retry_after_ns: c.retry_after_ns,
            too_large: c.too_large != 0,
        }),
        3 => {
            let band = if c.over_limit != 0 {
                sluicegate_core::Band::OverLimit
            } else {
                sluicegate_core::Band::Normal
            };
            Outcome::Shed(Shed { band, load: c.load, retry_after_ns: c.retry_after_ns })
        }
        4 => Outcome::RejectSpend(match c.reason {
            0 => SpendRejection::SpendLimitExceeded,
            1 => SpendRejection::AccountSuspended,
            _ => return Err(SgErrInvalidArgument),
        }),
        6 => Outcome::RejectConcurrency(ConcurrencyLimited {
            max_in_flight: c.reason,
            retry_after_ns: c.retry_after_ns,
        }),
        5 => Outcome::RejectInvalid(match c.reason {
            0 => InvalidRequest::ZeroN,
            1 => InvalidRequest::CachedExceedsPrompt,
            2 => InvalidRequest::Overflow,
            _ => return Err(SgErrInvalidArgument),
        }),
        _ => return Err(SgErrInvalidArgument),
    };
    Ok(Decision { outcome, levels: Levels::from_raw(c.debt, c.interval), cost: PerMetric(c.cost) })
}

/// Fills `render` for `dialect` with the engine's preferences (per-second limits under
/// fireworks_2026), jitter seed 0 and the wall clock read now: `unix_ns` is the system's real
/// time and `monotonic_at` is `sg_now_ns()` at the same moment, so Anthropic's resets are real
/// dates for `now_ns` from `sg_now_ns()`. A gateway that passes its own clock as `now_ns` sets
/// `monotonic_at` to that clock's reading now (and `unix_ns` too, if it keeps the wall clock
/// itself). A wall clock before 1970 reads as 1970.
///
/// # Safety
/// `engine` must be a live engine; `render` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_render_init(
    engine: *const sg_engine,
    dialect: u32,
    render: *mut sg_render,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, render) = unsafe { (arg(engine)?, out(render)?) };
        let d = *Dialect::ALL.get(dialect as usize).ok_or(SgErrInvalidArgument)?;
        let monotonic_at = sluicegate_core::clock::now_ns();
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX));
        *render = sg_render {
            dialect,
            per_second: u32::from(engine.inner.render(d).per_second),
            unix_ns,
            monotonic_at,
            jitter_seed: 0,
        };
        Ok(())
    })
}

/// The HTTP status for a decision in a dialect (200, 400, 402, 429 or 503).
///
/// # Safety
/// `decision` and `render` NULL or valid; `status` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_render_status(
    decision: *const sg_decision,
    render: *const sg_render,
    status: *mut u32,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (d, r, status) = unsafe { (arg(decision)?, arg(render)?, out(status)?) };
        *status = u32::from(render_of(r)?.status(&decision_from(d)?));
        Ok(())
    })
}

/// Writes `name: value\r\n` lines for every header into `buf`; `*written` receives the length,
/// or on `SG_ERR_BUFFER_TOO_SMALL` the length needed. The text is not NUL-terminated.
///
/// # Safety
/// `decision`, `render` NULL or valid; `buf` NULL (with `len` 0) or `len` writable bytes;
/// `written` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_render_headers(
    decision: *const sg_decision,
    render: *const sg_render,
    now_ns: u64,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (d, r, buf, written) =
            unsafe { (arg(decision)?, arg(render)?, buffer(buf, len)?, out(written)?) };
        sized(write_headers(&decision_from(d)?, &render_of(r)?, now_ns, buf), written)
    })
}

/// Writes the JSON error body of a refused decision into `buf` (length 0 for an admitted one);
/// sizes as `sg_render_headers`.
///
/// # Safety
/// As `sg_render_headers`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_render_error_body(
    decision: *const sg_decision,
    render: *const sg_render,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (d, r, buf, written) =
            unsafe { (arg(decision)?, arg(render)?, buffer(buf, len)?, out(written)?) };
        sized(write_error_body(&decision_from(d)?, &render_of(r)?, buf), written)
    })
}

//! OpenAI-compatible JSON error bodies (SPEC §9), written without allocating.

use core::fmt::Write;

use crate::decision::{Decision, Outcome, SpendRejection};
use crate::response::{Render, error_type, whole_millis, whole_seconds};
use crate::text::{BufferTooSmall, Sink};

/// Writes the JSON error body for a refused `decision` into `out`; returns the bytes written
/// (0 for an admitted request, which has no body).
///
/// ```
/// use sluicegate_core::error_body::write_error_body;
/// use sluicegate_core::response::{Dialect, Render};
/// use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey};
/// let e = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
/// let d = e.admit(ScopeKey::new(b"a", b"m"), &Request::new(0).n(61), 0)?;
/// let mut buf = [0u8; 512];
/// let n = write_error_body(&d, &Render::new(Dialect::OpenAi), &mut buf)?;
/// let body = std::str::from_utf8(&buf[..n])?;
/// assert!(body.starts_with(r#"{"error":{"message":"#));
/// assert!(body.contains(r#""type":"dynamic_request_limited""#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_error_body(
    decision: &Decision,
    render: &Render,
    out: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let Some(kind) = error_type(decision) else { return Ok(0) };
    let mut s = Sink::new(out);
    let retry = render.retry_after_ns(decision);
    let _ = s.write_str("{\"error\":{\"message\":\"");
    let _ = match decision.outcome {
        Outcome::RejectRateLimited(r) if r.too_large => write!(
            s,
            "This request needs {} {} but the limit of {} per minute can never admit it; reduce the request.",
            decision.cost.get(r.metric),
            r.metric.name(),
            decision.levels.limit(r.metric)
        ),
        Outcome::RejectRateLimited(r) => write!(
            s,
            "Rate limit exceeded on {}: {} of {} per minute in use and this request needs {}; retry in {} s.",
            r.metric.name(),
            decision.levels.used(r.metric),
            decision.levels.limit(r.metric),
            decision.cost.get(r.metric),
            whole_seconds(r.retry_after_ns)
        ),
        Outcome::Shed(_) => {
            write!(s, "The model is overloaded; retry in {} s.", whole_seconds(retry.unwrap_or(0)))
        }
        Outcome::RejectConcurrency(c) => write!(
            s,
            "Too many requests in flight: at most {} of the account's requests may run at once; retry in {} s.",
            c.max_in_flight,
            whole_seconds(c.retry_after_ns)
        ),
        Outcome::RejectSpend(SpendRejection::SpendLimitExceeded) => {
            s.write_str("The account has reached its monthly spend limit.")
        }
        Outcome::RejectSpend(SpendRejection::AccountSuspended) => s.write_str("The account is suspended."),
        Outcome::RejectInvalid(reason) => s.write_str(reason.message()),
        Outcome::Admit(_) | Outcome::AdmitOverLimit(_) => Ok(()),
    };
    let _ = write!(s, "\",\"type\":\"{kind}\",\"code\":\"{kind}\",\"param\":null");
    if let Outcome::RejectRateLimited(r) = decision.outcome {
        let l = &decision.levels;
        let _ = write!(
            s,
            ",\"metric\":\"{}\",\"limit\":{},\"current_usage\":{},\"cost\":{},\"too_large\":{}",
            r.metric.name(),
            l.limit(r.metric),
            l.used(r.metric),
            decision.cost.get(r.metric),
            r.too_large
        );
    }
    if let Some(ns) = retry {
        let _ = write!(s, ",\"retry_after\":{},\"retry_after_ms\":{}", whole_seconds(ns), whole_millis(ns));
    }
    let _ = s.write_str("}}");
    s.finish()
}

//! Replaying a trace through an engine in simulated time, minute by minute.

use sluicegate_core::headers::for_each_header;
use sluicegate_core::response::Render;
use std::collections::HashSet;

use sluicegate_core::{
    Completion, Engine, Heap, Metric, Outcome, Request, ScopeKey, ServiceTier, Usage, Variant,
};

use crate::trace::TraceRequest;

const MINUTE_NS: u64 = 60_000_000_000;

/// What happened in one minute of the trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the trace's first request.
    pub minute: u64,
    /// Requests that arrived.
    pub demanded: u64,
    /// Admitted within their limits.
    pub admitted: u64,
    /// Admitted over a limit, at lower priority.
    pub over_limit: u64,
    /// Refused with 429.
    pub rate_limited: u64,
    /// Shed with 503.
    pub shed: u64,
    /// Refused as malformed (400) or for spend (402).
    pub refused: u64,
    /// Each metric's limit per minute at the minute's end, averaged over the scopes seen so
    /// far (`u64::MAX`: not enforced).
    pub limits: [u64; 4],
    /// The headers of the minute's last decision, if asked for.
    pub headers: Vec<(String, String)>,
}

/// Replays `requests` (time-ordered) through `engine`; every admitted request is settled at once
/// with its actual usage. `progress` is called with the number of requests done. A trace records
/// the tier each request ran at, so an account is granted priority the first time it asks.
pub fn replay(
    engine: &Engine<Heap>,
    requests: &[TraceRequest],
    render: Option<Render>,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Minute>, sluicegate_core::Error> {
    let mut minutes: Vec<Minute> = Vec::new();
    let mut scopes: Vec<(String, String, bool)> = Vec::new();
    let mut granted: HashSet<&str> = HashSet::new();
    for (done, r) in requests.iter().enumerate() {
        if r.service_tier == ServiceTier::Priority && granted.insert(&r.account) {
            engine.set_service_tier_grant(r.account.as_bytes(), ServiceTier::Priority)?;
        }
        let minute = r.t_ns / MINUTE_NS;
        while minutes.len() as u64 <= minute {
            close(engine, &scopes, minutes.last_mut());
            minutes.push(Minute { minute: minutes.len() as u64, ..Minute::default() });
        }
        let key = ScopeKey {
            account: r.account.as_bytes(),
            model: r.model.as_bytes(),
            variant: if r.fast { Variant::Fast } else { Variant::Regular },
        };
        let request = Request::new(r.prompt_tokens)
            .cached_tokens(r.cached_tokens)
            .max_tokens(r.max_tokens)
            .n(r.n)
            .service_tier(r.service_tier);
        let decision = engine.admit(key, &request, r.t_ns)?;
        let Some(m) = minutes.last_mut() else { continue };
        m.demanded += 1;
        match decision.outcome {
            Outcome::Admit(_) => m.admitted += 1,
            Outcome::AdmitOverLimit(_) => m.over_limit += 1,
            Outcome::RejectRateLimited(_) => m.rate_limited += 1,
            Outcome::Shed(_) => m.shed += 1,
            Outcome::RejectSpend(_) | Outcome::RejectInvalid(_) | Outcome::RejectConcurrency(_) => {
                m.refused += 1
            }
        }
        if let Some(render) = &render {
            m.headers.clear();
            for_each_header(&decision, render, r.t_ns, |n, v| m.headers.push((n.to_string(), v.to_string())));
        }
        if let Some(p) = decision.permit() {
            let usage = Usage {
                prompt_tokens: r.prompt_tokens,
                cached_tokens: r.cached_tokens,
                generated_tokens: r.generated_tokens,
            };
            // A permit is settled exactly once here; an error would be a bug worth surfacing.
            if let Err(e) = engine.settle(p, &usage, Completion::Success, r.t_ns) {
                eprintln!("settle failed: {e}");
            }
        }
        if !scopes.iter().any(|(a, mo, f)| *a == r.account && *mo == r.model && *f == r.fast) {
            scopes.push((r.account.clone(), r.model.clone(), r.fast));
        }
        progress(done as u64 + 1);
    }
    close(engine, &scopes, minutes.last_mut());
    Ok(minutes)
}

/// Records the limits at the end of `minute`.
fn close(engine: &Engine<Heap>, scopes: &[(String, String, bool)], minute: Option<&mut Minute>) {
    let Some(m) = minute else { return };
    let end = (m.minute + 1) * MINUTE_NS - 1;
    let mut sums = [0u128; 4];
    let mut seen = 0u128;
    for (account, model, fast) in scopes {
        let key = ScopeKey {
            account: account.as_bytes(),
            model: model.as_bytes(),
            variant: if *fast { Variant::Fast } else { Variant::Regular },
        };
        if let Ok(l) = engine.limits(key, end) {
            seen += 1;
            for (s, metric) in sums.iter_mut().zip(Metric::ALL) {
                *s = s.saturating_add(u128::from(l.limit(metric)));
            }
        }
    }
    m.limits = sums.map(|s| s.checked_div(seen).map_or(0, |mean| u64::try_from(mean).unwrap_or(u64::MAX)));
}

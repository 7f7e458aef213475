//! What a gateway answers for each outcome (SPEC §9): status code, error type, retry-after.

use crate::decision::{Decision, Outcome, SpendRejection};

/// How the gateway renders responses: the header dialect and what it needs to know.
///
/// ```
/// use sluicegate_core::response::{Dialect, Render};
/// let r = Render::new(Dialect::Anthropic).wall_clock(1_763_900_000_000_000_000, 0).jitter_seed(42);
/// assert_eq!(r.dialect, Dialect::Anthropic);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Render {
    /// Which provider's headers to send.
    pub dialect: Dialect,
    /// Fireworks 2026: report limits, and their remaining alike, per second instead of per minute.
    pub per_second: bool,
    /// Unix time (ns) at which the engine's clock read `monotonic_at`; needed for RFC 3339 resets.
    pub unix_ns: u64,
    /// The engine's clock at `unix_ns`.
    pub monotonic_at: u64,
    /// Seeds the jitter added to a 503's retry-after (e.g. a hash of the request id).
    pub jitter_seed: u64,
}

/// The header dialects sluicegate speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `x-ratelimit-{limit,remaining}-{requests,tokens-prompt,tokens-generated}`, `x-ratelimit-over-limit`.
    Fireworks,
    /// `x-ratelimit-{limit,remaining,reset}`, `x-tokenlimit-{limit,remaining}`.
    Together,
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` with durations like `6m0s`.
    OpenAi,
    /// `anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`.
    Anthropic,
    /// `RateLimit-Policy` and `RateLimit` structured fields (draft-ietf-httpapi-ratelimit-headers).
    Ietf,
}

impl Dialect {
    /// Every dialect.
    pub const ALL: [Dialect; 5] =
        [Dialect::Fireworks, Dialect::Together, Dialect::OpenAi, Dialect::Anthropic, Dialect::Ietf];

    /// The dialect's name as used by the CLI, C API and Python.
    pub const fn name(self) -> &'static str {
        match self {
            Dialect::Fireworks => "fireworks",
            Dialect::Together => "together",
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Ietf => "ietf",
        }
    }

    /// The dialect named `name`.
    pub fn from_name(name: &str) -> Option<Dialect> {
        Dialect::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Status for spend refusals: 402 Payment Required, or 429 where the provider uses it.
    pub const fn spend_status(self) -> u16 {
        match self {
            Dialect::OpenAi | Dialect::Ietf => 429,
            Dialect::Fireworks | Dialect::Together | Dialect::Anthropic => 402,
        }
    }
}

impl Render {
    /// Rendering in `dialect`, per-minute limits, no wall clock, jitter seed 0.
    pub const fn new(dialect: Dialect) -> Self {
        Render { dialect, per_second: false, unix_ns: 0, monotonic_at: 0, jitter_seed: 0 }
    }

    /// Reports limits and remaining per second (Fireworks' 2026 headers).
    pub const fn per_second(self, per_second: bool) -> Self {
        Render { per_second, ..self }
    }

    /// Anchors the engine's clock to wall time: at `unix_ns` it read `monotonic_at`.
    pub const fn wall_clock(self, unix_ns: u64, monotonic_at: u64) -> Self {
        Render { unix_ns, monotonic_at, ..self }
    }

    /// Seeds the 503 jitter.
    pub const fn jitter_seed(self, seed: u64) -> Self {
        Render { jitter_seed: seed, ..self }
    }

    /// The HTTP status for `decision`.
    pub const fn status(&self, decision: &Decision) -> u16 {
        match decision.outcome {
            Outcome::Admit(_) | Outcome::AdmitOverLimit(_) => 200,
            Outcome::RejectRateLimited(_) | Outcome::RejectConcurrency(_) => 429,
            Outcome::Shed(_) => 503,
            Outcome::RejectSpend(_) => self.dialect.spend_status(),
            Outcome::RejectInvalid(_) => 400,
        }
    }

    /// How long the client should wait, ns: the real time until the request fits for a 429; for
    /// a 503, whole seconds with seeded jitter, so that shed clients do not return in lockstep
    /// even after `retry-after` rounds to seconds (SPEC §9).
    ///
    /// The 503 wait is the shed delay rounded up to whole seconds (at least 1), plus a whole
    /// number of seconds chosen from the seed in `0..=max(1, ⌈that / 2⌉)`: with the default 1 s
    /// delay, 1 or 2 s; with 10 s, 10 to 15 s. It is never below the shed delay and at most
    /// [`shed_retry_max_ns`] of it. Being whole seconds, `retry-after` and `retry-after-ms`
    /// agree exactly. `None` when there is nothing to wait for.
    pub fn retry_after_ns(&self, decision: &Decision) -> Option<u64> {
        match decision.outcome {
            Outcome::RejectRateLimited(r) if !r.too_large => Some(r.retry_after_ns),
            Outcome::RejectConcurrency(c) => Some(c.retry_after_ns),
            Outcome::Shed(s) => {
                let (base, spread) = shed_seconds(s.retry_after_ns);
                let jitter = splitmix(self.jitter_seed) % (spread + 1);
                Some(base.saturating_add(jitter).saturating_mul(NANOS_PER_SECOND))
            }
            _ => None,
        }
    }
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A shed delay in whole seconds (rounded up, at least 1) and the most whole seconds of jitter
/// added to it (half of it rounded up, at least 1).
const fn shed_seconds(delay_ns: u64) -> (u64, u64) {
    let base = whole_seconds(delay_ns);
    let base = if base == 0 { 1 } else { base };
    (base, base.div_ceil(2))
}

/// The longest a 503 with shed delay `delay_ns` asks the client to wait, ns (saturating): the
/// delay in whole seconds plus the most jitter, see [`Render::retry_after_ns`].
///
/// ```
/// use sluicegate_core::response::shed_retry_max_ns;
/// assert_eq!(shed_retry_max_ns(1_000_000_000), 2_000_000_000);
/// assert_eq!(shed_retry_max_ns(10_000_000_000), 15_000_000_000);
/// ```
pub const fn shed_retry_max_ns(delay_ns: u64) -> u64 {
    let (base, spread) = shed_seconds(delay_ns);
    base.saturating_add(spread).saturating_mul(NANOS_PER_SECOND)
}

/// The `type` an error body carries for a refused decision.
pub const fn error_type(decision: &Decision) -> Option<&'static str> {
    match decision.outcome {
        Outcome::Admit(_) | Outcome::AdmitOverLimit(_) => None,
        Outcome::RejectRateLimited(r) if r.metric.is_request_limited() => Some("dynamic_request_limited"),
        Outcome::RejectRateLimited(_) => Some("dynamic_token_limited"),
        Outcome::Shed(_) => Some("service_overloaded"),
        Outcome::RejectConcurrency(_) => Some("concurrency_limited"),
        Outcome::RejectSpend(SpendRejection::SpendLimitExceeded) => Some("spend_limit_exceeded"),
        Outcome::RejectSpend(SpendRejection::AccountSuspended) => Some("account_suspended"),
        Outcome::RejectInvalid(_) => Some("invalid_request"),
    }
}

/// Whole seconds, rounded up.
pub const fn whole_seconds(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// Whole milliseconds, rounded up.
pub const fn whole_millis(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

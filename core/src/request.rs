//! What a caller tells the engine about a request, before and after it runs.

use crate::metric::PerMetric;
use crate::service_tier::ServiceTier;

/// A request as the gateway sees it before forwarding (SPEC §2).
///
/// ```
/// use sluicegate_core::Request;
/// let r = Request::new(1200).max_tokens(256).n(2);
/// assert_eq!(r.costs().map(|c| c.0), Ok([2, 1200, 1200, 512]));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Prompt tokens, cached and uncached.
    pub prompt_tokens: u64,
    /// Prompt tokens the caller expects to hit the prompt cache (default 0: all uncached).
    pub cached_tokens: u64,
    /// The request's `max_tokens`.
    pub max_tokens: u64,
    /// Expected generated tokens per choice, when the caller knows better than `max_tokens`.
    pub expected_tokens: Option<u64>,
    /// Choices (`n`); each counts as a request.
    pub n: u64,
    /// How many times the prompt is counted (default once, whatever `n`).
    pub prompt_copies: u64,
    /// The service tier asked for (SPEC §6); the account's grant caps it.
    pub service_tier: ServiceTier,
}

/// Why a request is malformed (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidRequest {
    /// `n` or the prompt copy count is zero.
    ZeroN,
    /// More cached tokens than prompt tokens.
    CachedExceedsPrompt,
    /// A cost overflows 64 bits.
    Overflow,
}

impl InvalidRequest {
    /// A short message for error bodies.
    pub const fn message(self) -> &'static str {
        match self {
            InvalidRequest::ZeroN => "n must be at least 1",
            InvalidRequest::CachedExceedsPrompt => "cached tokens exceed prompt tokens",
            InvalidRequest::Overflow => "token counts overflow",
        }
    }
}

impl Request {
    /// A request with `prompt_tokens`, nothing cached, no generation reserved, `n = 1`.
    pub const fn new(prompt_tokens: u64) -> Self {
        Request {
            prompt_tokens,
            cached_tokens: 0,
            max_tokens: 0,
            expected_tokens: None,
            n: 1,
            prompt_copies: 1,
            service_tier: ServiceTier::Default,
        }
    }

    /// Sets `max_tokens`.
    pub const fn max_tokens(self, max_tokens: u64) -> Self {
        Request { max_tokens, ..self }
    }

    /// Sets the expected cached prompt tokens.
    pub const fn cached_tokens(self, cached_tokens: u64) -> Self {
        Request { cached_tokens, ..self }
    }

    /// Sets `n`.
    pub const fn n(self, n: u64) -> Self {
        Request { n, ..self }
    }

    /// Asks for a service tier: `Flex` is shed first, `Priority` last. The account's grant
    /// ([`crate::Engine::set_service_tier_grant`]) caps it; asking above it is served at it.
    pub const fn service_tier(self, service_tier: ServiceTier) -> Self {
        Request { service_tier, ..self }
    }

    /// Sets the expected generated tokens per choice.
    pub const fn expected_tokens(self, expected: u64) -> Self {
        Request { expected_tokens: Some(expected), ..self }
    }

    /// The cost on each metric, or why the request is malformed.
    pub fn costs(&self) -> Result<PerMetric<u64>, InvalidRequest> {
        if self.n == 0 || self.prompt_copies == 0 {
            return Err(InvalidRequest::ZeroN);
        }
        if self.cached_tokens > self.prompt_tokens {
            return Err(InvalidRequest::CachedExceedsPrompt);
        }
        let per_choice = self.expected_tokens.map_or(self.max_tokens, |e| e.min(self.max_tokens));
        let prompt = self.prompt_tokens.checked_mul(self.prompt_copies);
        let uncached = (self.prompt_tokens - self.cached_tokens).checked_mul(self.prompt_copies);
        let generated = self.n.checked_mul(per_choice);
        match (prompt, uncached, generated) {
            (Some(p), Some(u), Some(g)) => Ok(PerMetric([self.n, p, u, g])),
            _ => Err(InvalidRequest::Overflow),
        }
    }
}

/// What a request actually used, reported at settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// Prompt tokens, cached and uncached.
    pub prompt_tokens: u64,
    /// Prompt tokens the backend served from its cache.
    pub cached_tokens: u64,
    /// Generated tokens, all choices.
    pub generated_tokens: u64,
}

impl Usage {
    /// Usage of `prompt_tokens` uncached and `generated_tokens` generated.
    pub const fn new(prompt_tokens: u64, generated_tokens: u64) -> Self {
        Usage { prompt_tokens, cached_tokens: 0, generated_tokens }
    }

    /// The actual amount on each token metric (requests are never corrected).
    pub(crate) fn tokens(&self) -> Option<[u64; 3]> {
        let uncached = self.prompt_tokens.checked_sub(self.cached_tokens)?;
        Some([self.prompt_tokens, uncached, self.generated_tokens])
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Completion {
    /// It ran; its usage counts toward limit growth.
    Success,
    /// The backend failed it; the buckets take its real usage but growth does not count it.
    UpstreamFailure,
    /// The client went away; it settles with what it used, which counts.
    Cancelled,
}

impl Completion {
    /// Usage that counts toward limit growth is also what is billed.
    pub(crate) const fn counts(self) -> bool {
        !matches!(self, Completion::UpstreamFailure)
    }
}

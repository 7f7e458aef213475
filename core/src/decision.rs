//! The answer to every admission: exactly one outcome (SPEC §4) and the levels behind it.

use crate::bucket::{self, Band, QUANTUM_NS};
use crate::metric::{Metric, PerMetric};
use crate::permit::Permit;
use crate::request::InvalidRequest;
use crate::shed::LoadPermille;

/// A 429: some metric would go beyond the hard band.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimited {
    /// The metric that binds: `dynamic_request_limited` if `Requests`, else token limited.
    pub metric: Metric,
    /// Time until this request would fit, ns (0 when `too_large`).
    pub retry_after_ns: u64,
    /// The request costs more than the hard band holds: it can never pass at the current limit.
    pub too_large: bool,
}

/// A 503: the model is overloaded for this request's class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shed {
    /// The band the request would have run in.
    pub band: Band,
    /// The model's load when it was shed.
    pub load: LoadPermille,
    /// Suggested wait before retrying, ns.
    pub retry_after_ns: u64,
}

/// A 429: the account already has as many permits outstanding as it may (SPEC §8,
/// `max_in_flight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConcurrencyLimited {
    /// The account's cap on outstanding permits.
    pub max_in_flight: u32,
    /// Suggested wait before retrying, ns.
    pub retry_after_ns: u64,
}

/// Why an account's requests are refused (402/429).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpendRejection {
    /// The account reached its monthly spend limit.
    SpendLimitExceeded,
    /// An operator suspended the account (e.g. a failed payment).
    AccountSuspended,
}

/// Exactly one outcome per admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Within every limit: run now (`x-ratelimit-over-limit: no`).
    Admit(Permit),
    /// Over a limit but within the hard band: run at lower priority.
    AdmitOverLimit(Permit),
    /// 429.
    RejectRateLimited(RateLimited),
    /// 503.
    Shed(Shed),
    /// 402/429: the account may not spend.
    RejectSpend(SpendRejection),
    /// 429: too many of the account's requests are in flight.
    RejectConcurrency(ConcurrencyLimited),
    /// 400.
    RejectInvalid(InvalidRequest),
}

/// The scope's buckets at the moment of a decision, for headers and error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Levels {
    /// Debt per metric in quanta (after the request, if admitted).
    pub(crate) debt_q: [u64; 4],
    /// Quanta per token (32.32) per metric; 0 = unlimited.
    pub(crate) interval: [u64; 4],
}

impl Levels {
    /// Levels from their plain-integer form ([`Levels::to_raw`]); any values are safe.
    pub const fn from_raw(debt_q: [u64; 4], interval: [u64; 4]) -> Self {
        Levels { debt_q, interval }
    }

    /// The debts (µs) and intervals (µs per unit, 32.32 fixed point) behind the levels.
    pub const fn to_raw(&self) -> ([u64; 4], [u64; 4]) {
        (self.debt_q, self.interval)
    }

    /// The limit per minute (`u64::MAX` if the metric is not enforced).
    pub fn limit(&self, metric: Metric) -> u64 {
        bucket::limit_of(*PerMetric(self.interval).get(metric))
    }

    /// Units of the metric in use, a part-used unit counted whole: within the limit
    /// `used + remaining == limit`, as the headers report them; more than the limit while over it.
    pub fn used(&self, metric: Metric) -> u64 {
        bucket::tokens_owed(*PerMetric(self.debt_q).get(metric), *PerMetric(self.interval).get(metric))
    }

    /// Whole units left before the metric's normal limit is exhausted.
    pub fn remaining(&self, metric: Metric) -> u64 {
        bucket::remaining(*PerMetric(self.debt_q).get(metric), *PerMetric(self.interval).get(metric))
    }

    /// Time until the metric's bucket is full again, ns.
    pub fn reset_ns(&self, metric: Metric) -> u64 {
        PerMetric(self.debt_q).get(metric).saturating_mul(QUANTUM_NS)
    }

    /// Whether some metric is past its normal limit.
    pub fn over_limit(&self) -> bool {
        self.debt_q.iter().zip(self.interval).any(|(d, t)| t != 0 && *d > bucket::WINDOW_Q)
    }
}

/// An admission decision: the outcome and the levels it was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    /// What to do with the request.
    pub outcome: Outcome,
    /// The scope's levels at the decision.
    pub levels: Levels,
    /// What the request costs on each metric (requests and tokens).
    pub cost: PerMetric<u64>,
}

impl Decision {
    pub(crate) fn invalid(reason: InvalidRequest) -> Self {
        Decision {
            outcome: Outcome::RejectInvalid(reason),
            levels: Levels::default(),
            cost: PerMetric::default(),
        }
    }

    /// The permit, if the request was admitted (in either band).
    pub fn permit(&self) -> Option<&Permit> {
        match &self.outcome {
            Outcome::Admit(p) | Outcome::AdmitOverLimit(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the request may run.
    pub fn admitted(&self) -> bool {
        self.permit().is_some()
    }

    /// How long a rejected client should wait before retrying, ns.
    pub fn retry_after_ns(&self) -> Option<u64> {
        match self.outcome {
            Outcome::RejectRateLimited(r) if !r.too_large => Some(r.retry_after_ns),
            Outcome::Shed(s) => Some(s.retry_after_ns),
            Outcome::RejectConcurrency(c) => Some(c.retry_after_ns),
            _ => None,
        }
    }
}

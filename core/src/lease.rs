//! Leases (SPEC §11, many hosts): an engine whose scopes admit from a share of a global bucket,
//! leased from elsewhere (a Redis shared by replicas), instead of from their own buckets. The
//! engine still does everything else: concurrency caps, spend, shedding, permits, their ledger
//! and their expiry. See [`crate::Engine::admit_leased`].

use crate::bucket::Band;
use crate::decision::{Levels, RateLimited};
use crate::key::ScopeKey;
use crate::metric::PerMetric;

/// A scope as its lease sees it: the slot it lives in (below `Capacity::scopes`) and the id of
/// the scope there. An idle scope's slot may be reclaimed for another key, which gets another
/// id, so a lease kept per slot must check the id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeasedScope {
    /// Index of the scope's slot.
    pub slot: usize,
    /// Id of the scope in that slot.
    pub id: u64,
}

/// A lease's answer to a request's costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// All four costs were taken from the lease, in this band.
    Taken(Band),
    /// The lease cannot cover them; nothing was taken.
    Refused(RateLimited),
}

/// Where the scopes of an engine take their costs from, in place of their own buckets.
///
/// Both methods are called on the hot path: they must not block, allocate or panic.
pub trait Lease {
    /// Takes `cost` (requests and tokens, per metric) for `scope`, all or nothing, and says
    /// what is left for the headers.
    fn take(
        &self,
        scope: LeasedScope,
        key: ScopeKey<'_>,
        cost: PerMetric<u64>,
        now_ns: u64,
    ) -> (Grant, Levels);

    /// Corrects what `take` took for `scope`, per metric: a positive delta is usage beyond what
    /// was taken (charged, even into debt), a negative one is given back (unused reservation,
    /// or a request that was not served after all).
    fn adjust(&self, scope: LeasedScope, delta: [i128; 4], now_ns: u64);
}

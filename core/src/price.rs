//! Prices per model variant and what a settled request costs (SPEC §8).

use crate::tier::Micros;

/// A model variant's prices, in micro-dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Price {
    /// Prompt tokens that missed the cache.
    pub uncached_prompt: Micros,
    /// Prompt tokens served from the cache.
    pub cached_prompt: Micros,
    /// Generated tokens.
    pub generated: Micros,
}

/// Spend is accumulated in nano-dollars so that per-request rounding stays below a micro-dollar
/// over a thousand requests; it is reported in micro-dollars.
pub type Nanos = u64;

/// Nano-dollars per micro-dollar.
pub const NANOS_PER_MICRO: u64 = 1_000;

impl Price {
    /// What `uncached`, `cached` and `generated` tokens cost, in nano-dollars (rounded down,
    /// saturating).
    ///
    /// ```
    /// use sluicegate_core::price::Price;
    /// // $0.90 per million tokens of every kind: 1,000 tokens cost $0.0009 = 900,000 nano-dollars.
    /// let p = Price { uncached_prompt: 900_000, cached_prompt: 900_000, generated: 900_000 };
    /// assert_eq!(p.cost(600, 200, 200), 900_000);
    /// ```
    pub fn cost(&self, uncached: u64, cached: u64, generated: u64) -> Nanos {
        let part = |tokens: u64, per_million: Micros| u128::from(tokens) * u128::from(per_million);
        // Each part is below 2^128, but their sum need not be: saturate, never wrap to a small cost.
        let pico = part(uncached, self.uncached_prompt)
            .saturating_add(part(cached, self.cached_prompt))
            .saturating_add(part(generated, self.generated));
        // tokens × µ$/Mtok = 10^-12 $; a thousandth of that is a nano-dollar.
        u64::try_from(pico / 1_000).unwrap_or(u64::MAX)
    }
}

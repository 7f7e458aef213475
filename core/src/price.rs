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
        // tokens × µ$/Mtok = 10^-12 $; a thousandth of that is a nano-dollar. Dividing a u128 is
        // a library call on the hot path; almost every sum fits 64 bits, where it is a multiply.
        match u64::try_from(pico) {
            Ok(pico) => pico / 1_000,
            Err(_) => u64::try_from(pico / 1_000).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Price;

    /// Costs past 64 bits of pico-dollars are still exact, and past 64 bits of nano-dollars
    /// saturate.
    #[test]
    fn costs_past_64_bits_are_exact_then_saturate() {
        let p = Price { uncached_prompt: 1 << 30, cached_prompt: 0, generated: 0 };
        // 2^70 pico-dollars, a thousandth of it in nano-dollars.
        assert_eq!(p.cost(1 << 40, 0, 0), 1_180_591_620_717_411_303);
        assert_eq!(p.cost(u64::MAX, 0, 0), u64::MAX);
        assert_eq!(p.cost(1_000, 0, 0), 1 << 30);
    }
}

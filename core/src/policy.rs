//! Policies: presets plus parameters (SPEC §5, §6).

use crate::bucket::{self, Bands, MAX_HORIZON_Q, QUANTUM_NS, WINDOW_Q};
use crate::error::PolicyError;
use crate::metric::{Metric, PerMetric};
use crate::shed::ShedThresholds;
use crate::tier::Tiers;

const MINUTE_NS: u64 = 60_000_000_000;
/// Longest adaptation tick a policy may have: one hour.
pub const MAX_TICK_NS: u64 = 60 * MINUTE_NS;

/// An override name that is not one of [`Policy::OVERRIDES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownParameter;

impl core::fmt::Display for UnknownParameter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("unknown policy parameter")
    }
}

impl core::error::Error for UnknownParameter {}

/// A metric's bounds, per minute: the limit starts at `floor` and adapts up to `ceiling`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricLimits {
    /// Starting (and lowest) limit per minute.
    pub floor: f64,
    /// Highest limit per minute.
    pub ceiling: f64,
}

impl MetricLimits {
    /// A metric that is not enforced.
    pub const UNLIMITED: MetricLimits = MetricLimits { floor: f64::INFINITY, ceiling: f64::INFINITY };

    /// A limit that never adapts.
    pub const fn fixed(per_minute: f64) -> Self {
        MetricLimits { floor: per_minute, ceiling: per_minute }
    }

    /// Whether the metric is enforced at all.
    pub fn is_limited(&self) -> bool {
        self.floor.is_finite() && self.floor < bucket::UNLIMITED_F64
    }
}

/// How limits adapt to usage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adaptation {
    /// Limits stay at their floor: a plain limiter.
    Fixed,
    /// Fireworks' rule: grow on sustained use, hold, or decay toward recent use.
    Threshold(ThresholdRule),
    /// Together's rule: the limit is a multiple of an EWMA of successful usage.
    Ewma(EwmaRule),
}

/// Parameters of [`Adaptation::Threshold`] (SPEC §5 defaults in [`ThresholdRule::FIREWORKS`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThresholdRule {
    /// Utilisation at or above which the limit grows (θ_up).
    pub grow_at: f64,
    /// Utilisation below which the limit decays (θ_down).
    pub decay_below: f64,
    /// While the limit is under twice its floor it doubles every this many ns (slow start).
    pub slow_start_doubling_ns: u64,
    /// Past slow start it grows by this fraction of the floor per minute.
    pub linear_step: f64,
    /// Idle limits halve every this many ns, down to the floor.
    pub decay_half_life_ns: u64,
    /// Decay stops at this multiple of the recent peak usage (κ).
    pub peak_factor: f64,
    /// The recent peak usage halves every this many ns (its one-hour horizon).
    pub peak_half_life_ns: u64,
}

impl ThresholdRule {
    /// The rule that reproduces Fireworks' published ramp: 60 → 120 → 720 → 1440 RPM.
    pub const FIREWORKS: ThresholdRule = ThresholdRule {
        grow_at: 0.8,
        decay_below: 0.5,
        slow_start_doubling_ns: 10 * MINUTE_NS,
        linear_step: 0.2,
        decay_half_life_ns: 60 * MINUTE_NS,
        peak_factor: 2.0,
        peak_half_life_ns: 60 * MINUTE_NS,
    };
}

/// Parameters of [`Adaptation::Ewma`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EwmaRule {
    /// Time constant of the usage average, ns. `1 h / ln 2` lets a limit double per hour.
    pub time_constant_ns: u64,
    /// The limit is this multiple of the average usage.
    pub usage_factor: f64,
}

impl EwmaRule {
    /// Together's rule: twice the average successful usage, doubling at most once an hour.
    pub const TOGETHER: EwmaRule = EwmaRule { time_constant_ns: 5_193_876_648_700, usage_factor: 2.0 };
}

/// Everything that decides admission for every scope of an engine.
///
/// ```
/// use sluicegate_core::{Metric, Policy};
/// let p = Policy::fireworks_2024();
/// assert_eq!(p.limits.get(Metric::Requests).floor, 60.0);
/// assert_eq!(Policy::preset("together").map(|p| p.hard_factor), Some(1.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Floor and ceiling per metric, per minute.
    pub limits: PerMetric<MetricLimits>,
    /// ρ: requests run over-limit until a bucket is this many minutes in debt (1 = no band).
    pub hard_factor: f64,
    /// Smoothing: a request that would be rejected but fits within this wait is delayed instead.
    pub max_wait_ns: u64,
    /// How limits adapt.
    pub adaptation: Adaptation,
    /// Adaptation period.
    pub tick_ns: u64,
    /// Load thresholds at which each class of request is shed.
    pub shed: ShedThresholds,
    /// `retry_after` given to shed requests, ns.
    pub shed_retry_after_ns: u64,
    /// Spending tiers: spend limits, qualification and rate-limit ceiling scales.
    pub tiers: Tiers,
    /// Fireworks-dialect headers give token limits per second (their 2026 form).
    pub per_second_headers: bool,
    /// Most permits one account may have outstanding (SPEC §8); beyond, `RejectConcurrency`.
    /// `None`: a quarter of the engine's permit ledger, so that no one account can fill it.
    pub max_in_flight: Option<u32>,
    /// A permit not settled within this many ns expires (SPEC §7): its reservation stays
    /// charged, and what it held is released by whoever next meets it. Default 15 minutes.
    pub permit_ttl_ns: u64,
}

impl Policy {
    /// Names accepted by [`Policy::preset`].
    pub const PRESETS: [&'static str; 4] = ["fireworks_2024", "fireworks_2026", "together", "fixed"];

    /// Fireworks' 2024 dynamic limits: 60 RPM, 60k prompt TPM, 6k generated TPM, over-limit to 2×.
    pub fn fireworks_2024() -> Self {
        Policy {
            limits: PerMetric([
                MetricLimits { floor: 60.0, ceiling: 2_000.0 },
                MetricLimits { floor: 60_000.0, ceiling: 2_000_000.0 },
                // 2024 had no uncached metric; the prompt bound never lets it bind first.
                MetricLimits { floor: 60_000.0, ceiling: 2_000_000.0 },
                MetricLimits { floor: 6_000.0, ceiling: 200_000.0 },
            ]),
            hard_factor: 2.0,
            max_wait_ns: 0,
            adaptation: Adaptation::Threshold(ThresholdRule::FIREWORKS),
            tick_ns: MINUTE_NS,
            shed: ShedThresholds::DEFAULT,
            shed_retry_after_ns: 1_000_000_000,
            tiers: Tiers::FIREWORKS,
            per_second_headers: false,
            permit_ttl_ns: 15 * MINUTE_NS,
            max_in_flight: None,
        }
    }

    /// Fireworks' 2026 token limits: 3.6M prompt, 900k uncached, 36k generated TPM; no RPM.
    pub fn fireworks_2026() -> Self {
        Policy {
            limits: PerMetric([
                MetricLimits::UNLIMITED,
                MetricLimits { floor: 3_600_000.0, ceiling: 36_000_000.0 },
                MetricLimits { floor: 900_000.0, ceiling: 9_000_000.0 },
                MetricLimits { floor: 36_000.0, ceiling: 360_000.0 },
            ]),
            per_second_headers: true,
            ..Self::fireworks_2024()
        }
    }

    /// Together's dynamic rate: no over-limit band (above the rate is 429), smoothing of bursts.
    pub fn together() -> Self {
        Policy {
            hard_factor: 1.0,
            max_wait_ns: 2_000_000_000,
            adaptation: Adaptation::Ewma(EwmaRule::TOGETHER),
            ..Self::fireworks_2024()
        }
    }

    /// A plain limiter at the 2024 floors: no adaptation, no over-limit band, no smoothing.
    pub fn fixed() -> Self {
        let base = Self::fireworks_2024();
        Policy {
            limits: base.limits.map(|_, l| MetricLimits::fixed(l.floor)),
            hard_factor: 1.0,
            adaptation: Adaptation::Fixed,
            ..base
        }
    }

    /// A preset by name (one of [`Policy::PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "fireworks_2024" => Some(Self::fireworks_2024()),
            "fireworks_2026" => Some(Self::fireworks_2026()),
            "together" => Some(Self::together()),
            "fixed" => Some(Self::fixed()),
            _ => None,
        }
    }

    /// Names accepted by [`Overrides::set`](crate::Overrides::set).
    pub const OVERRIDES: [&'static str; 19] = crate::overrides::NAMES;

    /// The preset with `overrides` resolved and checked (see [`Overrides`](crate::Overrides)).
    ///
    /// ```
    /// use sluicegate_core::{Metric, Overrides, Policy};
    /// let mut o = Overrides::default();
    /// o.set("requests_per_minute", 600.0).unwrap();
    /// let p = Policy::fixed().with(&o).unwrap();
    /// assert_eq!(p.limits.get(Metric::Requests).ceiling, 600.0);
    /// assert!(o.set("requests_per_hour", 1.0).is_err());
    /// ```
    pub fn with(&self, overrides: &crate::Overrides) -> Result<Policy, PolicyError> {
        overrides.apply(self)
    }

    /// Sets a metric's floor and ceiling to one fixed value (its limit under `fixed`).
    pub fn with_fixed_limit(mut self, metric: Metric, per_minute: f64) -> Self {
        *self.limits.get_mut(metric) = MetricLimits::fixed(per_minute);
        self
    }

    /// Checks that the policy is usable and derives its bucket capacities.
    pub fn bands(&self) -> Result<Bands, PolicyError> {
        for (metric, l) in self.limits.iter() {
            let bad_floor = l.floor.is_nan() || l.floor < 1.0;
            if bad_floor || l.ceiling.is_nan() {
                return Err(PolicyError::BadLimit(metric));
            }
            if l.floor > l.ceiling {
                return Err(PolicyError::FloorAboveCeiling(metric));
            }
        }
        if !(self.hard_factor >= 1.0 && self.hard_factor.is_finite()) {
            return Err(PolicyError::BadHardFactor);
        }
        let hard_q = libm::ceil(self.hard_factor * WINDOW_Q as f64) as u64;
        let max_wait_q = self.max_wait_ns / QUANTUM_NS;
        if hard_q.saturating_add(max_wait_q) > MAX_HORIZON_Q {
            return Err(PolicyError::HorizonTooLong);
        }
        // At most an hour: a word is re-sealed every tick, and its epoch tag reads ±19 hours.
        if !(1_000_000..=MAX_TICK_NS).contains(&self.tick_ns) {
            return Err(PolicyError::BadTick);
        }
        if self.permit_ttl_ns < 1_000_000_000 {
            return Err(PolicyError::BadPermitTtl);
        }
        self.adaptation_is_valid()?;
        if !self.shed.is_ordered() {
            return Err(PolicyError::BadShedThresholds);
        }
        if !self.tiers.is_ordered() {
            return Err(PolicyError::BadTiers);
        }
        Ok(Bands { normal_q: WINDOW_Q, hard_q, max_wait_q })
    }

    fn adaptation_is_valid(&self) -> Result<(), PolicyError> {
        let ok = match self.adaptation {
            Adaptation::Fixed => true,
            Adaptation::Threshold(r) => {
                r.decay_below <= r.grow_at
                    && r.decay_below >= 0.0
                    && r.linear_step >= 0.0
                    && r.linear_step.is_finite()
                    && r.peak_factor >= 0.0
                    && r.peak_factor.is_finite()
                    && r.slow_start_doubling_ns > 0
                    && r.decay_half_life_ns > 0
                    && r.peak_half_life_ns > 0
            }
            Adaptation::Ewma(r) => {
                r.time_constant_ns > 0 && r.usage_factor > 0.0 && r.usage_factor.is_finite()
            }
        };
        if ok { Ok(()) } else { Err(PolicyError::BadAdaptation) }
    }
}

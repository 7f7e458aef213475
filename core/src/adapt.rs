//! Closed forms of limit adaptation (SPEC §5): one call applies any number of missed ticks.

use crate::policy::{Adaptation, EwmaRule, MetricLimits, ThresholdRule};

const MINUTE_NS: f64 = 60.0e9;

/// A metric's adaptive state between ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricState {
    /// The current limit per minute (S, already clamped to floor and ceiling).
    pub limit: f64,
    /// The threshold rule's decaying peak usage per minute, or the EWMA rule's average.
    pub memory: f64,
}

impl MetricState {
    /// The state of a scope that has never been used.
    pub fn fresh(adaptation: &Adaptation, bounds: MetricLimits) -> Self {
        let memory = match adaptation {
            Adaptation::Ewma(r) => bounds.floor / r.usage_factor,
            _ => 0.0,
        };
        MetricState { limit: bounds.floor, memory }
    }
}

/// Whether `state` behaves exactly like a fresh scope's from now on, so the scope may be
/// forgotten (SPEC §1): its limit is the floor, and its memory either is a fresh scope's or —
/// for the threshold rule — a peak too small ever to hold a limit above the floor (κ·peak ≤ F).
pub fn is_forgettable(adaptation: &Adaptation, state: MetricState, bounds: MetricLimits) -> bool {
    let fresh = MetricState::fresh(adaptation, bounds);
    let memory_inert = match adaptation {
        Adaptation::Threshold(r) => r.peak_factor * state.memory <= bounds.floor,
        _ => state.memory == fresh.memory,
    };
    state.limit == fresh.limit && memory_inert
}

/// What happened since the last tick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Period {
    /// Usage settled during the period (tokens or requests).
    pub usage: u64,
    /// Length of the period, ns (whole ticks).
    pub duration_ns: u64,
    /// The model's load was at or above the in-limit shedding threshold: hold instead of grow.
    pub loaded: bool,
}

/// The state after `period`, usage spread evenly over it.
pub fn next(
    adaptation: &Adaptation,
    state: MetricState,
    bounds: MetricLimits,
    period: Period,
) -> MetricState {
    if !bounds.is_limited() || period.duration_ns == 0 {
        return state;
    }
    let minutes = period.duration_ns as f64 / MINUTE_NS;
    let per_minute = period.usage as f64 / minutes;
    let next = match adaptation {
        Adaptation::Fixed => MetricState { limit: bounds.floor, memory: 0.0 },
        Adaptation::Threshold(r) => threshold(r, state, bounds, per_minute, period),
        Adaptation::Ewma(r) => ewma(r, state, bounds, per_minute, period),
    };
    MetricState { limit: next.limit.clamp(bounds.floor, bounds.ceiling), memory: next.memory }
}

fn halve(value: f64, elapsed_ns: u64, half_life_ns: u64) -> f64 {
    value * libm::exp2(-(elapsed_ns as f64) / half_life_ns as f64)
}

fn threshold(r: &ThresholdRule, s: MetricState, b: MetricLimits, per_minute: f64, p: Period) -> MetricState {
    let mut peak = halve(s.memory, p.duration_ns, r.peak_half_life_ns).max(per_minute);
    if peak < 1.0 {
        peak = 0.0;
    }
    let utilisation = per_minute / s.limit;
    let limit = if utilisation >= r.grow_at {
        if p.loaded { s.limit } else { grow(r, s.limit, b.floor, p.duration_ns) }
    } else if utilisation >= r.decay_below {
        s.limit
    } else {
        let toward_use = s.limit.min(r.peak_factor * peak);
        halve(s.limit, p.duration_ns, r.decay_half_life_ns).max(toward_use).max(b.floor)
    };
    MetricState { limit, memory: peak }
}

/// Slow start (doubling) while under twice the floor, then linear growth.
fn grow(r: &ThresholdRule, limit: f64, floor: f64, duration_ns: u64) -> f64 {
    let doubling = r.slow_start_doubling_ns as f64;
    let linear_per_ns = r.linear_step * floor / MINUTE_NS;
    let elapsed = duration_ns as f64;
    let target = 2.0 * floor;
    if limit >= target {
        return limit + linear_per_ns * elapsed;
    }
    let to_target = doubling * libm::log2(target / limit);
    if elapsed <= to_target {
        limit * libm::exp2(elapsed / doubling)
    } else {
        target + linear_per_ns * (elapsed - to_target)
    }
}

fn ewma(r: &EwmaRule, s: MetricState, b: MetricLimits, per_minute: f64, p: Period) -> MetricState {
    let keep = libm::exp(-(p.duration_ns as f64) / r.time_constant_ns as f64);
    // Below floor / factor the average would not change the limit; stopping there lets an idle
    // scope return exactly to a fresh one.
    let average = (per_minute + (s.memory - per_minute) * keep).max(b.floor / r.usage_factor);
    let mut limit = (r.usage_factor * average).clamp(b.floor, b.ceiling);
    if p.loaded {
        limit = limit.min(s.limit);
    }
    MetricState { limit, memory: average }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    const MINUTE: u64 = 60_000_000_000;

    fn at_limit(policy: &Policy, minutes: u64) -> f64 {
        let bounds = policy.limits.0[0];
        let mut s = MetricState::fresh(&policy.adaptation, bounds);
        for _ in 0..minutes {
            let usage = s.limit as u64;
            s = next(&policy.adaptation, s, bounds, Period { usage, duration_ns: MINUTE, loaded: false });
        }
        s.limit
    }

    #[test]
    fn sustained_use_doubles_in_ten_minutes_then_grows_linearly() {
        let mut p = Policy::fireworks_2024();
        p.limits.0[0].ceiling = 1e9;
        assert!((at_limit(&p, 10) - 120.0).abs() < 0.01);
        assert!((at_limit(&p, 60) - 720.0).abs() < 0.01);
        assert!((at_limit(&p, 120) - 1440.0).abs() < 0.01);
    }

    #[test]
    fn missed_ticks_catch_up_in_one_call() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 1e9 };
        let s = MetricState::fresh(&p.adaptation, bounds);
        // Sixty minutes at 60/min of usage per minute spread evenly: sustained, so it grows.
        let one =
            next(&p.adaptation, s, bounds, Period { usage: 3600, duration_ns: 60 * MINUTE, loaded: false });
        assert!(one.limit > 60.0);
    }

    #[test]
    fn idle_limits_decay_to_the_floor() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 2000.0 };
        let s = MetricState { limit: 1440.0, memory: 1440.0 };
        let after =
            next(&p.adaptation, s, bounds, Period { usage: 0, duration_ns: 8 * 60 * MINUTE, loaded: false });
        assert_eq!(after.limit, 60.0);
    }

    #[test]
    fn decay_never_raises_a_limit() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 2000.0 };
        let s = MetricState { limit: 200.0, memory: 1000.0 };
        let after = next(&p.adaptation, s, bounds, Period { usage: 10, duration_ns: MINUTE, loaded: false });
        assert!(after.limit <= 200.0);
    }

    #[test]
    fn load_holds_growth() {
        let p = Policy::fireworks_2024();
        let bounds = p.limits.0[0];
        let s = MetricState::fresh(&p.adaptation, bounds);
        let after = next(&p.adaptation, s, bounds, Period { usage: 60, duration_ns: MINUTE, loaded: true });
        assert_eq!(after.limit, 60.0);
    }

    /// A fresh EWMA scope remembers the average that holds its limit at the floor
    /// (floor / usage factor), so the first idle ticks leave it exactly fresh; the other rules
    /// remember nothing.
    #[test]
    fn a_fresh_scope_remembers_the_floor_under_ewma_and_nothing_otherwise() {
        let bounds = MetricLimits { floor: 60.0, ceiling: 1_000.0 };
        let ewma = Policy::together().adaptation;
        assert_eq!(MetricState::fresh(&ewma, bounds), MetricState { limit: 60.0, memory: 30.0 });
        let thirds = Adaptation::Ewma(EwmaRule { usage_factor: 3.0, ..EwmaRule::TOGETHER });
        assert_eq!(MetricState::fresh(&thirds, bounds), MetricState { limit: 60.0, memory: 20.0 });
        for other in [Policy::fireworks_2024().adaptation, Adaptation::Fixed] {
            assert_eq!(MetricState::fresh(&other, bounds), MetricState { limit: 60.0, memory: 0.0 });
        }
        // An idle tick keeps a fresh EWMA scope exactly fresh (and so forgettable).
        let idle = Period { usage: 0, duration_ns: 10 * MINUTE, loaded: false };
        let fresh = MetricState::fresh(&ewma, bounds);
        assert_eq!(next(&ewma, fresh, bounds, idle), fresh);
        assert!(is_forgettable(&ewma, next(&ewma, fresh, bounds, idle), bounds));
    }

    /// No time passed, or nothing enforced: the state stays exactly as it was, under every rule.
    #[test]
    fn an_empty_period_or_an_unlimited_metric_changes_nothing() {
        let limited = MetricLimits { floor: 60.0, ceiling: 1_000.0 };
        let used = MetricState { limit: 200.0, memory: 100.0 };
        let rules = [Policy::fireworks_2024().adaptation, Policy::together().adaptation, Adaptation::Fixed];
        for rule in rules {
            let empty = Period { usage: 500, duration_ns: 0, loaded: false };
            assert_eq!(next(&rule, used, limited, empty), used, "{rule:?}");
            let unlimited = MetricLimits::UNLIMITED;
            let state = MetricState { limit: f64::INFINITY, memory: 7.0 };
            for usage in [0, 1_000_000] {
                let minute = Period { usage, duration_ns: MINUTE, loaded: false };
                let after = next(&rule, state, unlimited, minute);
                assert_eq!(after.limit, f64::INFINITY, "{rule:?}");
                assert_eq!(after.memory, 7.0, "{rule:?}");
            }
        }
    }

    /// The threshold rule drops a remembered peak below one unit a minute, so an idle scope's
    /// memory returns to exactly nothing; a peak of one a minute is kept.
    #[test]
    fn a_peak_below_one_a_minute_is_forgotten() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 2_000.0 };
        let idle_hour = Period { usage: 0, duration_ns: 60 * MINUTE, loaded: false };
        // One peak half-life: 1.5 halves to 0.75, 2 to exactly 1.
        let below = next(&p.adaptation, MetricState { limit: 60.0, memory: 1.5 }, bounds, idle_hour);
        assert_eq!(below, MetricState { limit: 60.0, memory: 0.0 });
        let at_one = next(&p.adaptation, MetricState { limit: 60.0, memory: 2.0 }, bounds, idle_hour);
        assert_eq!(at_one, MetricState { limit: 60.0, memory: 1.0 });
    }

    /// An idle limit decays, but not below κ (2) times the recent peak, itself decaying.
    #[test]
    fn decay_stops_at_twice_the_recent_peak() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 2_000.0 };
        let idle_hour = Period { usage: 0, duration_ns: 60 * MINUTE, loaded: false };
        // An hour halves both: the limit to 500, the peak to 400, which holds the limit at 800.
        let after = next(&p.adaptation, MetricState { limit: 1_000.0, memory: 800.0 }, bounds, idle_hour);
        assert_eq!(after, MetricState { limit: 800.0, memory: 400.0 });
        // A small peak does not hold it: 100 → 50, and the limit halves.
        let after = next(&p.adaptation, MetricState { limit: 1_000.0, memory: 100.0 }, bounds, idle_hour);
        assert_eq!(after, MetricState { limit: 500.0, memory: 50.0 });
    }

    /// Growth over a period longer than what remains of slow start: doubling up to twice the
    /// floor, then linear (20% of the floor a minute) for the rest, in one closed form.
    #[test]
    fn growth_crosses_from_slow_start_to_linear_within_one_period() {
        let p = Policy::fireworks_2024();
        let bounds = MetricLimits { floor: 60.0, ceiling: 2_000.0 };
        let fresh = MetricState::fresh(&p.adaptation, bounds);
        let grow = |state: MetricState, minutes: u64| {
            // Usage at the current limit: sustained.
            let usage = state.limit as u64 * minutes;
            next(&p.adaptation, state, bounds, Period { usage, duration_ns: minutes * MINUTE, loaded: false })
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // 5 minutes of slow start: 60 · 2^(5/10).
        assert!(close(grow(fresh, 5).limit, 60.0 * core::f64::consts::SQRT_2), "{:?}", grow(fresh, 5));
        // 10 minutes to reach 120, then 10 minutes at +12 a minute.
        assert!(close(grow(fresh, 20).limit, 240.0), "{:?}", grow(fresh, 20));
        // Already past slow start: linear from the start of the period.
        let grown = MetricState { limit: 200.0, memory: 200.0 };
        assert!(close(grow(grown, 10).limit, 320.0), "{:?}", grow(grown, 10));
    }

    #[test]
    fn together_doubles_at_most_once_an_hour() {
        let p = Policy::together();
        let mut bounds = p.limits.0[0];
        bounds.ceiling = 1e9;
        let mut s = MetricState::fresh(&p.adaptation, bounds);
        for _ in 0..60 {
            let usage = s.limit as u64;
            s = next(&p.adaptation, s, bounds, Period { usage, duration_ns: MINUTE, loaded: false });
        }
        assert!(s.limit <= 121.0 && s.limit >= 115.0, "{}", s.limit);
    }
}

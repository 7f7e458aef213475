//! Overrides of a preset, by the names every surface uses (Python keywords, the CLI's `--set`,
//! C's `sg_config`): collected first, then resolved and checked once, so the order they are
//! given in never changes the policy.

use crate::error::PolicyError;
use crate::metric::{Metric, PerMetric};
use crate::policy::{Adaptation, MAX_TICK_NS, MetricLimits, Policy, UnknownParameter};

/// Names accepted by [`Overrides::set`]: `<metric>_per_minute`, `<metric>_ceiling`, the scalars,
/// then the six shedding thresholds in the order their classes are shed.
pub const NAMES: [&str; 19] = [
    "requests_per_minute",
    "prompt_tokens_per_minute",
    "uncached_prompt_tokens_per_minute",
    "generated_tokens_per_minute",
    "requests_ceiling",
    "prompt_tokens_ceiling",
    "uncached_prompt_tokens_ceiling",
    "generated_tokens_ceiling",
    "hard_factor",
    "max_wait",
    "tick",
    "permit_ttl",
    "max_in_flight",
    "shed_over_limit_flex",
    "shed_in_limit_flex",
    "shed_over_limit_default",
    "shed_over_limit_priority",
    "shed_in_limit_default",
    "shed_in_limit_priority",
];

const HARD_FACTOR: usize = 8;
const MAX_WAIT: usize = 9;
const TICK: usize = 10;
const PERMIT_TTL: usize = 11;
const MAX_IN_FLIGHT: usize = 12;
/// The first of the six shedding thresholds' names in [`NAMES`].
pub const SHED: usize = 13;
/// The highest shedding threshold, in units of capacity: a load in ‰ is a `u32`.
const SHED_MAX: f64 = 4_000_000.0;

/// Parameters set over a preset. What is set is what is enforced:
/// - `<metric>_per_minute` is the metric's limit (its floor when limits adapt); `inf` turns the
///   metric off under any preset.
/// - Under `fixed`, naming any metric's limit enforces only the named metrics; `fixed` with no
///   limit named (or only metrics turned off) is a plain limiter at Fireworks' 2024 floors.
/// - `<metric>_ceiling` bounds adaptation; without one, the preset's ceiling, raised to the floor.
/// - `hard_factor` is ρ; `max_wait`, `tick` and `permit_ttl` are seconds (`max_wait = 0` turns
///   smoothing off, `permit_ttl = inf` lets permits live forever).
/// - `max_in_flight` caps one account's outstanding permits (`inf`: no cap).
/// - `shed_<class>` is the load (1 = the model at capacity) at which that class is shed (SPEC
///   §6); the six must stay in shedding order, each at most the next.
///
/// ```
/// use sluicegate_core::{Metric, Overrides, Policy, PolicyError};
/// let mut o = Overrides::default();
/// o.set("requests_per_minute", 5.0)?;
/// let p = o.apply(&Policy::fixed())?;
/// assert_eq!(p.limits.get(Metric::Requests).floor, 5.0);
/// assert!(!p.limits.get(Metric::GeneratedTokens).is_limited()); // only what was named
///
/// // A floor above its ceiling is refused whichever comes first.
/// let mut o = Overrides::default();
/// o.set("requests_ceiling", 60.0)?;
/// o.set("requests_per_minute", 100.0)?;
/// assert_eq!(o.apply(&Policy::fireworks_2024()), Err(PolicyError::FloorAboveCeiling(Metric::Requests)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overrides {
    values: [Option<f64>; NAMES.len()],
}

impl Overrides {
    /// Sets `name` to `value` (a later value for the same name replaces an earlier one). Values
    /// are checked by [`Overrides::apply`].
    pub fn set(&mut self, name: &str, value: f64) -> Result<(), UnknownParameter> {
        let i = NAMES.iter().position(|n| *n == name).ok_or(UnknownParameter)?;
        if let Some(v) = self.values.get_mut(i) {
            *v = Some(value);
        }
        Ok(())
    }

    /// The value set for `name`, if any.
    pub fn get(&self, name: &str) -> Option<f64> {
        let i = NAMES.iter().position(|n| *n == name)?;
        self.values.get(i).copied().flatten()
    }

    /// The preset with these overrides, resolved together and checked once.
    ///
    /// # Errors
    /// [`PolicyError::BadParameter`] names a value out of its range; the others come from
    /// [`Policy::bands`] on the result.
    pub fn apply(&self, preset: &Policy) -> Result<Policy, PolicyError> {
        for (name, value) in NAMES.iter().zip(self.values) {
            if value.is_some_and(|v| !in_range(name, v)) {
                return Err(PolicyError::BadParameter(name));
            }
        }
        let mut policy = *preset;
        let fixed = matches!(preset.adaptation, Adaptation::Fixed);
        // Turning metrics off names no limit: the preset's others stay.
        let any_limit = self.values.iter().take(4).any(|v| v.is_some_and(f64::is_finite));
        policy.limits = PerMetric::from_fn(|m| {
            let given = self.values.get(m as usize).copied().flatten();
            let ceiling = self.values.get(4 + m as usize).copied().flatten();
            let old = preset.limits.get(m);
            let floor = match given {
                Some(v) => v,
                None if fixed && any_limit => f64::INFINITY,
                None => old.floor,
            };
            if floor == f64::INFINITY {
                return MetricLimits::UNLIMITED;
            }
            // A limit that did not adapt (every one under `fixed`, or one that was off) stays fixed.
            let ceiling =
                ceiling.unwrap_or(if old.floor == old.ceiling { floor } else { old.ceiling.max(floor) });
            MetricLimits { floor, ceiling }
        });
        let seconds = |i: usize| self.values.get(i).copied().flatten().map(seconds_to_ns);
        policy.hard_factor = self.values[HARD_FACTOR].unwrap_or(policy.hard_factor);
        policy.max_wait_ns = seconds(MAX_WAIT).unwrap_or(policy.max_wait_ns);
        policy.tick_ns = seconds(TICK).unwrap_or(policy.tick_ns);
        policy.permit_ttl_ns = seconds(PERMIT_TTL).unwrap_or(policy.permit_ttl_ns);
        if let Some(max) = self.values[MAX_IN_FLIGHT] {
            // In range: a whole number from 1 to u32::MAX, or inf (saturates to no cap).
            policy.max_in_flight = Some(max as u32);
        }
        let shed = &mut policy.shed;
        let thresholds = [
            &mut shed.over_limit_flex,
            &mut shed.in_limit_flex,
            &mut shed.over_limit_default,
            &mut shed.over_limit_priority,
            &mut shed.in_limit_default,
            &mut shed.in_limit_priority,
        ];
        for (threshold, value) in thresholds.into_iter().zip(self.values.iter().skip(SHED)) {
            if let Some(load) = value {
                // In range: 0 to SHED_MAX, so the permille fits a u32.
                *threshold = libm::round(load * 1000.0) as u32;
            }
        }
        policy.bands()?;
        Ok(policy)
    }
}

/// Seconds as ns, saturating (`inf` is the longest).
fn seconds_to_ns(seconds: f64) -> u64 {
    libm::round(seconds * 1e9) as u64
}

/// Whether `value` is one `name` may take; the rule is [`rule`]'s text.
fn in_range(name: &str, v: f64) -> bool {
    match name {
        "hard_factor" => v.is_finite() && v >= 1.0,
        "max_wait" => v.is_finite() && v >= 0.0,
        "tick" => v >= 0.001 && v * 1e9 <= MAX_TICK_NS as f64,
        "max_in_flight" => v >= 1.0 && (v.is_infinite() || (libm::trunc(v) == v && v <= f64::from(u32::MAX))),
        n if n.starts_with("shed_") => (0.0..=SHED_MAX).contains(&v),
        // Limits, ceilings and permit_ttl: at least 1 (inf allowed: off, none, never).
        _ => v >= 1.0,
    }
}

/// What a parameter must be, for its error message.
pub(crate) fn rule(name: &str) -> &'static str {
    match name {
        "hard_factor" => "a finite number of at least 1",
        "max_wait" => "a finite number of seconds, 0 or more (0 turns smoothing off)",
        "tick" => "a number of seconds from 0.001 to 3600",
        "permit_ttl" => "a number of seconds of at least 1, or inf for never",
        "max_in_flight" => "a whole number of at least 1, or inf for no cap",
        n if n.starts_with("shed_") => "a load from 0 to 4000000 (1 is the model at capacity)",
        n if n.ends_with("_ceiling") => "a number of at least 1, or inf for no ceiling",
        _ => "a number of at least 1, or inf to turn the metric off",
    }
}

impl Metric {
    /// The `<metric>_per_minute` override's name.
    pub const fn limit_parameter(self) -> &'static str {
        match self {
            Metric::Requests => "requests_per_minute",
            Metric::PromptTokens => "prompt_tokens_per_minute",
            Metric::UncachedPromptTokens => "uncached_prompt_tokens_per_minute",
            Metric::GeneratedTokens => "generated_tokens_per_minute",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(preset: Policy, pairs: &[(&str, f64)]) -> Result<Policy, PolicyError> {
        let mut o = Overrides::default();
        pairs.iter().try_for_each(|(n, v)| o.set(n, *v)).map_err(|_| PolicyError::BadParameter("?"))?;
        o.apply(&preset)
    }

    #[test]
    fn every_order_of_the_same_overrides_gives_the_same_result() {
        let a = [("requests_ceiling", 60.0), ("requests_per_minute", 100.0)];
        let b = [a[1], a[0]];
        for preset in Policy::PRESETS.map(|n| Policy::preset(n).unwrap()) {
            assert_eq!(apply(preset, &a), apply(preset, &b));
            assert_eq!(apply(preset, &a), Err(PolicyError::FloorAboveCeiling(Metric::Requests)));
        }
        let ok = [("requests_ceiling", 600.0), ("requests_per_minute", 100.0)];
        let p = apply(Policy::fireworks_2024(), &ok).unwrap();
        assert_eq!(*p.limits.get(Metric::Requests), MetricLimits { floor: 100.0, ceiling: 600.0 });
        assert_eq!(apply(Policy::fireworks_2024(), &[ok[1], ok[0]]), Ok(p));
    }

    #[test]
    fn fixed_enforces_only_the_limits_named() {
        let p = apply(Policy::fixed(), &[("requests_per_minute", 5.0)]).unwrap();
        assert_eq!(*p.limits.get(Metric::Requests), MetricLimits::fixed(5.0));
        for m in [Metric::PromptTokens, Metric::UncachedPromptTokens, Metric::GeneratedTokens] {
            assert!(!p.limits.get(m).is_limited(), "{m:?}");
        }
        // Nothing named: the documented floors; only metrics turned off: the others' floors.
        assert_eq!(apply(Policy::fixed(), &[("hard_factor", 1.5)]).unwrap().limits, Policy::fixed().limits);
        let p = apply(Policy::fixed(), &[("generated_tokens_per_minute", f64::INFINITY)]).unwrap();
        assert_eq!(p.limits.get(Metric::Requests), Policy::fixed().limits.get(Metric::Requests));
        assert!(!p.limits.get(Metric::GeneratedTokens).is_limited());
        // Adaptive presets keep the others.
        let p = apply(Policy::fireworks_2024(), &[("requests_per_minute", 100.0)]).unwrap();
        assert_eq!(
            p.limits.get(Metric::GeneratedTokens),
            Policy::fireworks_2024().limits.get(Metric::GeneratedTokens)
        );
        assert_eq!(*p.limits.get(Metric::Requests), MetricLimits { floor: 100.0, ceiling: 2_000.0 });
        let p = apply(Policy::fireworks_2024(), &[("requests_per_minute", 5_000.0)]).unwrap();
        assert_eq!(*p.limits.get(Metric::Requests), MetricLimits::fixed(5_000.0));
        // A metric the preset had off, turned on: a fixed limit.
        let p = apply(Policy::fireworks_2026(), &[("requests_per_minute", 100.0)]).unwrap();
        assert_eq!(*p.limits.get(Metric::Requests), MetricLimits::fixed(100.0));
    }

    #[test]
    fn the_shedding_thresholds_are_loads_in_shedding_order() {
        let p =
            apply(Policy::fireworks_2024(), &[("shed_in_limit_flex", 0.65), ("shed_over_limit_flex", 0.0)])
                .unwrap();
        let d = crate::ShedThresholds::DEFAULT;
        assert_eq!(p.shed, crate::ShedThresholds { over_limit_flex: 0, in_limit_flex: 650, ..d });
        let all = [0.1, 0.2, 0.3, 0.4, 0.5, 4_000_000.0];
        let named: [(&str, f64); 6] = core::array::from_fn(|i| (NAMES[SHED + i], all[i]));
        let p = apply(Policy::fixed(), &named).unwrap();
        assert_eq!(
            [p.shed.over_limit_flex, p.shed.in_limit_flex, p.shed.over_limit_default],
            [100, 200, 300]
        );
        assert_eq!(
            [p.shed.over_limit_priority, p.shed.in_limit_default, p.shed.in_limit_priority],
            [400, 500, 4_000_000_000]
        );
        // Out of shedding order, out of range, not a number.
        let refused = apply(Policy::fireworks_2024(), &[("shed_in_limit_default", 0.85)]);
        assert_eq!(refused, Err(PolicyError::BadShedThresholds));
        for (name, bad) in [
            ("shed_in_limit_priority", 4_000_000.5),
            ("shed_over_limit_flex", -0.1),
            ("shed_in_limit_flex", f64::NAN),
        ] {
            assert_eq!(apply(Policy::fireworks_2024(), &[(name, bad)]), Err(PolicyError::BadParameter(name)));
            assert!(rule(name).starts_with("a load"));
        }
    }

    #[test]
    fn inf_turns_a_metric_off_under_every_preset() {
        for preset in Policy::PRESETS.map(|n| Policy::preset(n).unwrap()) {
            let p = apply(preset, &[("generated_tokens_per_minute", f64::INFINITY)]).unwrap();
            assert_eq!(*p.limits.get(Metric::GeneratedTokens), MetricLimits::UNLIMITED);
            let others = [Metric::Requests, Metric::PromptTokens, Metric::UncachedPromptTokens];
            if !matches!(preset.adaptation, Adaptation::Fixed) {
                for m in others {
                    assert_eq!(p.limits.get(m), preset.limits.get(m));
                }
            }
        }
    }

    #[test]
    fn a_value_out_of_range_names_its_parameter() {
        let bad: [(&str, f64); 14] = [
            ("max_wait", f64::INFINITY),
            ("max_wait", f64::NAN),
            ("max_wait", -5.0),
            ("tick", 0.0),
            ("tick", 3_601.0),
            ("permit_ttl", 0.5),
            ("permit_ttl", f64::NAN),
            ("hard_factor", 0.5),
            ("hard_factor", f64::INFINITY),
            ("requests_per_minute", 0.5),
            ("requests_per_minute", f64::NAN),
            ("requests_per_minute", -1.0),
            ("prompt_tokens_ceiling", 0.0),
            ("generated_tokens_ceiling", f64::NAN),
        ];
        for (name, v) in bad {
            let e = apply(Policy::together(), &[(name, v)]).unwrap_err();
            assert_eq!(e, PolicyError::BadParameter(NAMES.iter().find(|n| **n == name).unwrap()));
        }
        let good: [(&str, f64); 6] = [
            ("max_wait", 0.0),
            ("tick", 0.001),
            ("tick", 3_600.0),
            ("permit_ttl", f64::INFINITY),
            ("hard_factor", 1.0),
            ("requests_ceiling", f64::INFINITY),
        ];
        for (name, v) in good {
            assert!(apply(Policy::fireworks_2024(), &[(name, v)]).is_ok(), "{name}={v}");
        }
        let p = apply(Policy::together(), &[("max_wait", 0.0), ("permit_ttl", f64::INFINITY)]).unwrap();
        assert_eq!((p.max_wait_ns, p.permit_ttl_ns), (0, u64::MAX));
        for bad in [2.5, 0.0, 5e9, f64::NAN] {
            let e = apply(Policy::fixed(), &[("max_in_flight", bad)]);
            assert_eq!(e, Err(PolicyError::BadParameter("max_in_flight")), "{bad}");
        }
        let cap = |v: f64| apply(Policy::fixed(), &[("max_in_flight", v)]).unwrap().max_in_flight;
        assert_eq!((cap(7.0), cap(f64::INFINITY)), (Some(7), Some(u32::MAX)));
    }

    #[test]
    fn unknown_names_are_refused_and_a_later_value_wins() {
        let mut o = Overrides::default();
        assert_eq!(o.set("requests_per_hour", 1.0), Err(UnknownParameter));
        o.set("tick", 30.0).unwrap();
        o.set("tick", 20.0).unwrap();
        assert_eq!(o.get("tick"), Some(20.0));
        assert_eq!(o.apply(&Policy::fixed()).unwrap().tick_ns, 20_000_000_000);
        for (i, m) in Metric::ALL.into_iter().enumerate() {
            assert_eq!(Some(m.limit_parameter()), NAMES.get(i).copied());
        }
    }
}

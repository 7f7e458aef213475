//! Bad input gets a typed error or a `RejectInvalid` decision, never a panic or changed state.

use sluicegate_core::bucket::{MAX_HORIZON_Q, QUANTUM_NS, WINDOW_Q};
use sluicegate_core::{
    Adaptation, Capacity, Completion, Engine, Error, EwmaRule, Heap, InvalidRequest, Metric, MetricLimits,
    Outcome, Overrides, Policy, PolicyError, Request, ScopeKey, SettleError, Table, ThresholdRule, Usage,
};

fn engine() -> Engine<Heap> {
    Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap()
}

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct", b"model");

#[test]
fn empty_and_over_long_keys_are_typed_errors() {
    let e = engine();
    assert_eq!(e.admit(ScopeKey::new(b"", b"m"), &Request::new(1), 0), Err(Error::EmptyKey));
    assert_eq!(e.admit(ScopeKey::new(b"a", b""), &Request::new(1), 0), Err(Error::EmptyKey));
    assert_eq!(
        e.admit(ScopeKey::new(&[b'a'; 65], b"m"), &Request::new(1), 0),
        Err(Error::KeyTooLong { max: 64 })
    );
    assert_eq!(
        e.admit(ScopeKey::new(b"a", &[b'm'; 129]), &Request::new(1), 0),
        Err(Error::KeyTooLong { max: 128 })
    );
    assert!(e.admit(ScopeKey::new(&[b'a'; 64], &[b'm'; 128]), &Request::new(1), 0).unwrap().admitted());
}

#[test]
fn zero_and_huge_capacities_are_refused() {
    for (capacity, table) in [
        (Capacity { scopes: 0, ..Capacity::scopes(8) }, Table::Scopes),
        (Capacity { accounts: 0, ..Capacity::scopes(8) }, Table::Accounts),
        (Capacity { models: 5_000, ..Capacity::scopes(8) }, Table::Models),
        (Capacity { permits: 1 << 23, ..Capacity::scopes(8) }, Table::Permits),
    ] {
        assert_eq!(Engine::new(Policy::fixed(), capacity).err(), Some(Error::BadCapacity(table)));
    }
}

/// Why an engine refuses Fireworks' 2024 policy changed by `f`; `None` if it accepts it.
fn with(f: impl FnOnce(&mut Policy)) -> Option<Error> {
    let mut p = Policy::fireworks_2024();
    f(&mut p);
    Engine::new(p, Capacity::scopes(8)).err()
}

#[test]
fn unusable_policies_are_refused() {
    assert_eq!(
        with(|p| p.limits.0[1] = MetricLimits { floor: 10.0, ceiling: 5.0 }),
        Some(Error::Policy(PolicyError::FloorAboveCeiling(Metric::PromptTokens)))
    );
    assert_eq!(
        with(|p| p.limits.0[0].floor = 0.0),
        Some(Error::Policy(PolicyError::BadLimit(Metric::Requests)))
    );
    assert_eq!(
        with(|p| p.limits.0[0].floor = f64::NAN),
        Some(Error::Policy(PolicyError::BadLimit(Metric::Requests)))
    );
    assert_eq!(with(|p| p.hard_factor = 0.9), Some(Error::Policy(PolicyError::BadHardFactor)));
    assert_eq!(with(|p| p.hard_factor = f64::NAN), Some(Error::Policy(PolicyError::BadHardFactor)));
    assert_eq!(with(|p| p.hard_factor = 4.0), Some(Error::Policy(PolicyError::HorizonTooLong)));
    assert_eq!(with(|p| p.tick_ns = 10), Some(Error::Policy(PolicyError::BadTick)));
    assert_eq!(with(|p| p.tick_ns = 19 * 3_600_000_000_000), Some(Error::Policy(PolicyError::BadTick)));
    assert_eq!(with(|p| p.shed.in_limit_priority = 100), Some(Error::Policy(PolicyError::BadShedThresholds)));
}

/// The horizon (hard factor's window plus the longest wait) and the permit lifetime are
/// accepted up to their very bounds and refused one step past them.
#[test]
fn horizon_and_permit_ttl_bounds_are_exact() {
    // fireworks_2024's hard factor is 2: two windows, the rest of the horizon may be waited.
    let longest_wait_ns = (MAX_HORIZON_Q - 2 * WINDOW_Q) * QUANTUM_NS;
    assert_eq!(with(|p| p.max_wait_ns = longest_wait_ns), None);
    assert_eq!(
        with(|p| p.max_wait_ns = longest_wait_ns + QUANTUM_NS),
        Some(Error::Policy(PolicyError::HorizonTooLong))
    );
    assert_eq!(with(|p| p.permit_ttl_ns = 1_000_000_000), None);
    assert_eq!(with(|p| p.permit_ttl_ns = 999_999_999), Some(Error::Policy(PolicyError::BadPermitTtl)));
}

/// Each parameter of the threshold rule is refused alone (the others Fireworks'), and accepted
/// at its bound.
#[test]
fn unusable_threshold_rules_are_refused() {
    let with = |rule| with(|p| p.adaptation = Adaptation::Threshold(rule));
    let ok = ThresholdRule::FIREWORKS;
    let refused = [
        ThresholdRule { decay_below: ok.grow_at + 0.01, ..ok },
        ThresholdRule { decay_below: -0.01, ..ok },
        ThresholdRule { decay_below: f64::NAN, ..ok },
        ThresholdRule { linear_step: -0.01, ..ok },
        ThresholdRule { linear_step: f64::INFINITY, ..ok },
        ThresholdRule { peak_factor: -0.01, ..ok },
        ThresholdRule { peak_factor: f64::INFINITY, ..ok },
        ThresholdRule { slow_start_doubling_ns: 0, ..ok },
        ThresholdRule { decay_half_life_ns: 0, ..ok },
        ThresholdRule { peak_half_life_ns: 0, ..ok },
    ];
    for rule in refused {
        assert_eq!(with(rule), Some(Error::Policy(PolicyError::BadAdaptation)), "{rule:?}");
    }
    let at_bounds = [
        ThresholdRule { decay_below: ok.grow_at, ..ok },
        ThresholdRule { decay_below: 0.0, linear_step: 0.0, peak_factor: 0.0, ..ok },
        ThresholdRule { slow_start_doubling_ns: 1, decay_half_life_ns: 1, peak_half_life_ns: 1, ..ok },
    ];
    for rule in at_bounds {
        assert_eq!(with(rule), None, "{rule:?}");
    }
}

/// An EWMA rule needs a positive time constant and a positive, finite usage factor; each
/// parameter is refused alone (the others valid), and the smallest valid values are accepted.
#[test]
fn unusable_ewma_rules_are_refused() {
    let with = |rule| with(|p| p.adaptation = Adaptation::Ewma(rule));
    let bad = Some(Error::Policy(PolicyError::BadAdaptation));
    let ok = EwmaRule::TOGETHER;
    assert_eq!(with(EwmaRule { time_constant_ns: 0, ..ok }), bad);
    for usage_factor in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        assert_eq!(with(EwmaRule { usage_factor, ..ok }), bad, "usage factor {usage_factor}");
    }
    assert_eq!(with(EwmaRule { time_constant_ns: 1, usage_factor: f64::MIN_POSITIVE }), None);
}

#[test]
fn overflowing_requests_are_invalid_and_change_nothing() {
    let e = engine();
    let before = e.limits(KEY, 0).unwrap();
    let cases = [
        (Request::new(1).n(0), InvalidRequest::ZeroN),
        (Request::new(10).cached_tokens(11), InvalidRequest::CachedExceedsPrompt),
        (Request::new(0).max_tokens(u64::MAX).n(2), InvalidRequest::Overflow),
        (Request { prompt_copies: u64::MAX, ..Request::new(2) }, InvalidRequest::Overflow),
    ];
    for (request, reason) in cases {
        assert_eq!(e.admit(KEY, &request, 0).unwrap().outcome, Outcome::RejectInvalid(reason));
    }
    assert_eq!(e.limits(KEY, 0).unwrap(), before);
}

#[test]
fn huge_token_counts_are_too_large_not_a_crash() {
    let e = engine();
    for tokens in [u64::MAX, u64::MAX / 2, 1 << 40] {
        let d = e.admit(KEY, &Request::new(tokens), 0).unwrap();
        assert!(matches!(d.outcome, Outcome::RejectRateLimited(r) if r.too_large), "{tokens}");
    }
}

#[test]
fn extreme_clock_values_never_panic() {
    let e = engine();
    for now in [u64::MAX, u64::MAX / 2, u64::MAX - 1, 0, 1] {
        let d = e.admit(KEY, &Request::new(1), now).unwrap();
        if let Some(p) = d.permit() {
            e.settle(p, &Usage::new(1, 0), Completion::Success, now).unwrap();
        }
        e.limits(KEY, now).unwrap();
    }
}

#[test]
fn impossible_usage_is_refused_and_the_permit_stays_settleable() {
    let e = engine();
    let p = *e.admit(KEY, &Request::new(100).max_tokens(100), 0).unwrap().permit().unwrap();
    let bad = Usage { prompt_tokens: 5, cached_tokens: 6, generated_tokens: 0 };
    assert_eq!(e.settle(&p, &bad, Completion::Success, 0), Err(SettleError::InvalidUsage));
    assert_eq!(e.charge(&p, u64::MAX, 0), Err(SettleError::InvalidUsage));
    e.settle(&p, &Usage::new(100, 50), Completion::Success, 0).unwrap();
    assert_eq!(e.limits(KEY, 0).unwrap().remaining(Metric::GeneratedTokens), 5_950);
}

#[test]
fn a_permit_from_another_engine_is_stale() {
    let (a, b) = (engine(), engine());
    let p = *a.admit(KEY, &Request::new(1), 0).unwrap().permit().unwrap();
    b.admit(KEY, &Request::new(1), 0).unwrap();
    assert_eq!(b.settle(&p, &Usage::new(1, 0), Completion::Success, 0), Err(SettleError::StalePermit));
    assert_eq!(b.charge(&p, 1, 0), Err(SettleError::StalePermit));
}

#[test]
fn a_full_scope_table_is_a_typed_error_and_existing_keys_keep_working() {
    let e =
        Engine::new(Policy::fixed(), Capacity { scopes: 4, accounts: 64, models: 2, permits: 64 }).unwrap();
    let mut full = None;
    for i in 0..64u32 {
        if let Err(err) = e.admit(ScopeKey::new(&i.to_le_bytes(), b"m"), &Request::new(1), 0) {
            full = Some((i, err));
            break;
        }
    }
    let (i, err) = full.expect("a four-slot table fills up");
    assert_eq!((i, err), (4, Error::TableFull(Table::Scopes)));
    assert!(e.admit(ScopeKey::new(&0u32.to_le_bytes(), b"m"), &Request::new(1), 0).unwrap().admitted());
}

#[test]
fn a_full_permit_ledger_refuses_admission_and_charges_nothing() {
    // One account may hold the whole (tiny) ledger here: the ledger, not the account's cap, binds.
    let policy = Policy { max_in_flight: Some(8), ..Policy::fixed() };
    let e = Engine::new(policy, Capacity { scopes: 8, accounts: 8, models: 2, permits: 2 }).unwrap();
    let first = *e.admit(KEY, &Request::new(1), 0).unwrap().permit().unwrap();
    e.admit(KEY, &Request::new(1), 0).unwrap();
    let before = e.limits(KEY, 0).unwrap();
    assert_eq!(e.admit(KEY, &Request::new(1), 0), Err(Error::TableFull(Table::Permits)));
    assert_eq!(e.limits(KEY, 0).unwrap(), before);
    e.settle(&first, &Usage::new(1, 0), Completion::Success, 0).unwrap();
    assert!(e.admit(KEY, &Request::new(1), 0).unwrap().admitted());
}

#[test]
fn a_capacity_the_machine_cannot_hold_is_an_error_not_an_abort() {
    let huge = Capacity { scopes: u32::MAX as usize, ..Capacity::scopes(8) };
    assert_eq!(Engine::new(Policy::fixed(), huge).err(), Some(Error::BadCapacity(Table::Scopes)));
}

/// Whatever the seed: all bits set or none, the engine count mixed into the incarnation must
/// still tell the engines apart.
#[test]
fn engines_sharing_a_seed_still_refuse_each_others_permits() {
    for seed in [42, 0, u64::MAX] {
        let make = || {
            let heap = sluicegate_core::Heap::new(Capacity::scopes(64)).unwrap();
            Engine::with_storage(Policy::fixed(), heap, seed).unwrap()
        };
        let (a, b) = (make(), make());
        let p = *a.admit(KEY, &Request::new(1), 0).unwrap().permit().unwrap();
        b.admit(KEY, &Request::new(1), 0).unwrap();
        let settled = b.settle(&p, &Usage::new(1, 0), Completion::Success, 0);
        assert_eq!(settled, Err(SettleError::StalePermit), "seed {seed:#x}");
    }
}

#[test]
fn an_infinite_permit_ttl_means_permits_never_expire() {
    let mut never = Overrides::default();
    never.set("permit_ttl", f64::INFINITY).unwrap();
    let policy = Policy::fixed().with(&never).unwrap();
    let e = Engine::new(policy, Capacity::scopes(64)).unwrap();
    let p = *e.admit(KEY, &Request::new(1), 0).unwrap().permit().unwrap();
    let hundred_days = 100 * 86_400 * 1_000_000_000;
    e.settle(&p, &Usage::new(1, 0), Completion::Success, hundred_days).unwrap();
    let mut nan = Overrides::default();
    nan.set("permit_ttl", f64::NAN).unwrap();
    assert_eq!(Policy::fixed().with(&nan).unwrap_err(), PolicyError::BadParameter("permit_ttl"));
    let short = Policy { permit_ttl_ns: 999_999_999, ..Policy::fixed() };
    assert_eq!(short.bands().unwrap_err(), PolicyError::BadPermitTtl);
}

/// Found by the reference model: with absurd token counts every cost saturates at u64::MAX µs,
/// and the 429 named the first metric instead of the one really largest.
#[test]
fn too_large_names_the_metric_with_the_largest_cost_even_when_costs_saturate() {
    let e = engine();
    let d = e.admit(KEY, &Request::new(u64::MAX).max_tokens(u64::MAX), 0).unwrap();
    match d.outcome {
        Outcome::RejectRateLimited(r) => {
            assert!(r.too_large);
            // 6,000 generated TPM against 60,000 prompt TPM: a generated token costs 10× more.
            assert_eq!(r.metric, Metric::GeneratedTokens);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_override_out_of_range_is_refused_with_a_message_that_names_it() {
    let cases = [
        ("max_wait", f64::INFINITY, "max_wait must be a finite number of seconds, 0 or more"),
        ("tick", f64::NAN, "tick must be a number of seconds from 0.001 to 3600"),
        ("hard_factor", 0.5, "hard_factor must be a finite number of at least 1"),
        ("permit_ttl", 0.5, "permit_ttl must be a number of seconds of at least 1, or inf for never"),
        ("requests_ceiling", 0.0, "requests_ceiling must be a number of at least 1, or inf for no ceiling"),
        (
            "prompt_tokens_per_minute",
            -1.0,
            "prompt_tokens_per_minute must be a number of at least 1, or inf to turn",
        ),
        ("max_in_flight", 2.5, "max_in_flight must be a whole number of at least 1, or inf for no cap"),
    ];
    for (name, value, message) in cases {
        let mut o = Overrides::default();
        o.set(name, value).unwrap();
        let e = Policy::together().with(&o).unwrap_err();
        assert!(e.to_string().starts_with(message), "{e}");
    }
}

/// An operator's per-account override must be a usable limit: a NaN or below-one floor, a NaN
/// ceiling or a floor above the ceiling is a typed error and changes nothing; a floor of
/// exactly one request a minute is accepted.
#[test]
fn unusable_account_overrides_are_refused() {
    let e = engine();
    let set = |floor: f64, ceiling: f64| {
        e.set_limits_override(b"a", Metric::Requests, Some(MetricLimits { floor, ceiling }), 0)
    };
    let limit = |e: &Engine<Heap>| e.limits(ScopeKey::new(b"a", b"m"), 0).unwrap().limit(Metric::Requests);
    let before = limit(&e);
    let bad = Err(Error::Policy(PolicyError::BadLimit(Metric::Requests)));
    assert_eq!(set(f64::NAN, 100.0), bad);
    assert_eq!(set(0.5, 100.0), bad);
    assert_eq!(set(10.0, f64::NAN), bad);
    assert_eq!(set(20.0, 10.0), Err(Error::Policy(PolicyError::FloorAboveCeiling(Metric::Requests))));
    assert_eq!(limit(&e), before, "refused overrides change nothing");
    assert_eq!(set(1.0, 1.0), Ok(()));
    assert_eq!(limit(&e), 1, "a floor and ceiling of one request a minute");
}
